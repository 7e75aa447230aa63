"""The RL controller: one process owns the dataflow, as plain calls on worker groups (verl's
single-controller pattern). One iteration::

    gens    = pool.generate(prompts, seeds)          # rollout actors (vLLM / transformers)
    batch   = collate(gens)                           # padded tensors, response mask
    batch  |= learner.compute(batch)                  # old/ref log-probs, entropy, values, RM
    scores  = rewards(prompts, responses)             # oracle / callables / reward model
    batch  |= advantages(spec, batch, scores, kl)     # GAE or group-relative (pure math)
    stats   = learner.update(batch, kl, iteration)    # PPO epochs over mini-batches
    sync    = weight_sync.sync()                      # learner -> every actor, versioned

With ``algo.one_step_off_policy`` the next batch is generated while the learner updates.
Every ``run.checkpoint_every`` iterations the learner's DeepSpeed state and this loop's
state are saved; a rerun with the same run name resumes from there.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from raystages.rl.algos import AdaptiveKLController, FixedKLController
from raystages.rl.batch import RunningMoments, advantages, collate, health, shape_scores
from raystages.rl.rewards import TextRewards, oracle_scores
from raystages.train.metrics import say


@dataclass
class LoopState:
    iteration: int = 0
    kl_coef: float = 0.0
    version: int = 0
    moments: list = field(default_factory=lambda: [0, 0.0, 0.0])
    before: dict = field(default_factory=dict)
    history: list = field(default_factory=list)


@dataclass
class Context:
    spec: object
    tokenizer: object
    pool: object  # RolloutPool
    learner: object  # LearnerGroup
    sync: object  # WeightSync
    prompts: list  # train prompt texts
    eval_prompts: list
    hooks: dict = field(default_factory=dict)  # event name -> fn(ctx, iteration); for tests and tools


def encode(tok, prompts: list[str]) -> list[list[int]]:
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)["input_ids"] for p in prompts]


def _seed(base: int, iteration: int, j: int) -> int:
    return (base * 1_000_003 + iteration * 10_007 + j) % (2**31 - 1)


def prompts_for(ctx: Context, iteration: int) -> list[str]:
    """The iteration's prompts, each repeated ``group_size`` times (group-contiguous rows):
    a pure function of (seed, iteration), so a resumed run draws what it would have drawn."""
    a = ctx.spec.algo
    per_epoch = max(1, len(ctx.prompts) // a.prompts_per_iteration)
    epoch, k = divmod(iteration, per_epoch)
    order = list(range(len(ctx.prompts)))
    random.Random(ctx.spec.run.seed * 7 + epoch).shuffle(order)
    picked = [ctx.prompts[order[(k * a.prompts_per_iteration + i) % len(order)]] for i in range(a.prompts_per_iteration)]
    return [p for p in picked for _ in range(a.group_size)]


def submit(ctx: Context, iteration: int):
    ctx.hooks.get("before_submit", lambda *_: None)(ctx, iteration)
    texts = prompts_for(ctx, iteration)
    seeds = [_seed(ctx.spec.run.seed, iteration, j) for j in range(len(texts))]
    r = ctx.spec.rollout
    return texts, ctx.pool.submit(encode(ctx.tokenizer, texts), seeds, r.temperature, r.max_new_tokens)


def score(ctx: Context, batch: dict, texts: list[str], responses: list[str]) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the reward sources ``(B,)`` and per-source means."""
    spec = ctx.spec
    text = TextRewards(spec.reward.sources)
    parts = {k: torch.tensor(v) for k, v in text(texts, responses).items()}
    weights = {k: w for k, (_, w) in text.fns.items()}
    model_src = [s for s in spec.reward.sources if s.kind == "model"]
    if model_src:
        rm = batch.pop("rm_scores", None)
        parts["model"] = rm if rm is not None else ctx.learner.score_texts(texts, responses)
        weights["model"] = model_src[0].weight
    total = sum(weights[k] * v.float() for k, v in parts.items())
    metrics = {f"reward_{k.split(':')[0]}": v.float().mean().item() for k, v in parts.items()}
    if "oracle" not in parts and (o := oracle_scores(texts, responses)) is not None:
        metrics["reward_oracle"] = sum(o) / len(o)
    metrics["reward"] = total.mean().item()
    return total, metrics


def _eval_rewards(ctx: Context, prompts: list[str], gens, prefix: str) -> dict:
    responses = [ctx.tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in gens]
    out = {f"{prefix}response_len": sum(len(g.response_ids) for g in gens) / len(gens)}
    for k, v in TextRewards(ctx.spec.reward.sources)(prompts, responses).items():
        out[f"{prefix}reward_{k.split(':')[0]}"] = sum(v) / len(v)
    if (o := oracle_scores(prompts, responses)) is not None:
        out[f"{prefix}reward_oracle"] = sum(o) / len(o)
        out[f"{prefix}accuracy"] = sum(x == 1.0 for x in o) / len(o)
    return out


def evaluate(ctx: Context) -> dict:
    """Held-out prompts with the rollout engine's current weights: greedy responses, and
    ``rollout.eval_samples`` sampled ones per prompt (fixed seeds, the rollout temperature)
    — the quantity RL optimises."""
    r = ctx.spec.rollout
    if not ctx.eval_prompts:
        return {}
    ids = encode(ctx.tokenizer, ctx.eval_prompts)
    gens = ctx.pool.generate(ids, [0] * len(ids), 0.0, r.max_new_tokens)
    out = {"version": gens[0].version} | _eval_rewards(ctx, ctx.eval_prompts, gens, "")
    if r.eval_samples and r.temperature > 0:
        prompts = [p for p in ctx.eval_prompts for _ in range(r.eval_samples)]
        ids = [x for x in ids for _ in range(r.eval_samples)]
        gens = ctx.pool.generate(ids, [_seed(-1, 0, j) for j in range(len(ids))], r.temperature, r.max_new_tokens)
        out |= _eval_rewards(ctx, prompts, gens, "sampled_")
    return out


def _check_limits(spec, h: dict) -> str | None:
    lim = spec.limits
    if lim.max_kl is not None and h["kl_ref"] > lim.max_kl:
        return f"KL to the reference {h['kl_ref']:.3g} exceeded limits.max_kl={lim.max_kl}"
    if lim.max_mean_response_len is not None and h["response_len"] > lim.max_mean_response_len:
        return f"mean response length {h['response_len']:.1f} exceeded limits.max_mean_response_len={lim.max_mean_response_len}"
    return None


def _save(ctx: Context, state: LoopState, run_dir: Path) -> None:
    ckpt = run_dir / "checkpoints" / f"iter_{state.iteration:06d}"
    shutil.rmtree(ckpt, ignore_errors=True)
    ctx.learner.save(str(ckpt))
    (ckpt / "loop.json").write_text(json.dumps(asdict(state)))
    # "latest" is written last: a crash mid-save leaves the previous checkpoint in charge.
    (run_dir / "checkpoints" / "latest.tmp").write_text(ckpt.name)
    (run_dir / "checkpoints" / "latest.tmp").rename(run_dir / "checkpoints" / "latest")
    for old in sorted((run_dir / "checkpoints").glob("iter_*"))[:-ctx.spec.run.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def _resume(ctx: Context, run_dir: Path) -> LoopState | None:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    ckpt = run_dir / "checkpoints" / latest.read_text().strip()
    ctx.learner.load(str(ckpt))
    state = LoopState(**json.loads((ckpt / "loop.json").read_text()))
    ctx.sync.version = state.version - 1
    ctx.sync.sync()  # the actors start from the base checkpoint: give them the resumed weights
    say(f"resumed from {ckpt.name} (iteration {state.iteration})")
    return state


def train(ctx: Context, run_dir: Path, log=None) -> dict:
    spec, a = ctx.spec, ctx.spec.algo
    state = _resume(ctx, run_dir) or LoopState(kl_coef=spec.kl.coef)
    kl = (AdaptiveKLController(state.kl_coef, spec.kl.target, spec.kl.horizon) if spec.kl.adaptive
          else FixedKLController(state.kl_coef))
    moments = RunningMoments()
    moments.n, moments.mean, moments.m2 = state.moments
    if not state.before:
        state.before = evaluate(ctx)
        say(f"before: {state.before}")
    aborted, metrics = None, {}
    pending = submit(ctx, state.iteration) if state.iteration < a.iterations else None
    while state.iteration < a.iterations:
        it, t0 = state.iteration, time.perf_counter()
        texts, work = pending
        gens = ctx.pool.collect(work)
        t_gen = time.perf_counter() - t0
        pending = None
        if a.one_step_off_policy and it + 1 < a.iterations:
            pending = submit(ctx, it + 1)  # generated with the current weights, during the update
        batch = collate(gens, ctx.tokenizer.pad_token_id)
        t1 = time.perf_counter()
        batch.update(ctx.learner.compute(batch))
        t_compute = time.perf_counter() - t1
        responses = [ctx.tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in gens]
        scores, metrics = score(ctx, batch, texts, responses)
        batch.update(advantages(spec, batch, shape_scores(scores, a, moments), kl.value))
        h = health(batch)
        t1 = time.perf_counter()
        metrics |= h | ctx.learner.update(batch, kl.value, it)
        t_update = time.perf_counter() - t1
        kl.update(h["kl_ref_k1"], len(gens))
        metrics |= ctx.sync.sync()
        stale = sum(g.version != state.version for g in gens)
        metrics |= {"iteration": it + 1, "kl_coef": kl.value, "stale_rollouts": stale, "gen_s": t_gen,
                    "gen_tokens_per_s": batch["response_len"].sum().item() / max(t_gen, 1e-9),
                    "compute_s": t_compute, "update_s": t_update, "iteration_s": time.perf_counter() - t0,
                    "actor_restarts": ctx.pool.restarts}
        state.iteration, state.version, state.kl_coef = it + 1, metrics["version"], kl.value
        state.moments = [moments.n, moments.mean, moments.m2]
        state.history.append({k: metrics[k] for k in ("iteration", "reward", "kl_ref", "response_len") if k in metrics}
                             | ({"reward_oracle": metrics["reward_oracle"]} if "reward_oracle" in metrics else {}))
        if log:
            log.log(it + 1, metrics)
        say(f"iter {it + 1}/{a.iterations} | reward {metrics['reward']:.3f}"
            + (f" | oracle {metrics['reward_oracle']:.3f}" if "reward_oracle" in metrics else "")
            + f" | kl {h['kl_ref']:.3f} | len {h['response_len']:.1f} | gap {h['logprob_gap_mean']:.1e}"
            + f" | clip {metrics.get('clip_frac', 0):.2f} | {metrics['iteration_s']:.1f}s")
        aborted = _check_limits(spec, h)
        if aborted:
            say(f"aborting: {aborted}")
            break
        if state.iteration % spec.run.checkpoint_every == 0 and state.iteration < a.iterations:
            _save(ctx, state, run_dir)
        if pending is None and state.iteration < a.iterations:
            pending = submit(ctx, state.iteration)
    after = evaluate(ctx)
    say(f"after: {after}")
    return {"before": state.before, "after": after, "aborted": aborted, "iterations": state.iteration,
            "last": metrics, "history": state.history, "actor_restarts": ctx.pool.restarts}
