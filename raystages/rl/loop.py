"""The RL loop, run SPMD by every learner rank inside Ray Train; rank 0 is the controller
(verl's single-controller dataflow, as plain calls). One iteration — ``[0]``: rank 0 alone,
``[0] -> r``: rank 0 scatters the rows, rank r receiving only its own, ``r -> [0]``: every
rank's rows gathered on rank 0, ``all``: every rank, collectively::

    gens    = pool.collect(submit(prompts, seeds))    [0]         rollout actors (vLLM / transformers)
    batch   = collate(gens)                           [0] -> r    padded tensors, response mask
    batch  |= learner.compute(batch)                  all, r->[0] old/ref log-probs, entropy, values, RM
    scores  = score(prompts, responses)               [0]         oracle / callables / reward model
    batch  |= advantages(spec, batch, scores, kl)     [0] -> r    GAE or group-relative (pure math)
    stats   = learner.update(batch, kl, iteration)    all         PPO epochs over mini-batches
    sync    = weight_sync.sync()                      all         rank 0 pushes to every actor, versioned

With ``algo.one_step_off_policy`` the next batch is generated while the learner updates.

Checkpoints are Ray Train's: every ``run.checkpoint_every`` iterations every rank saves its
DeepSpeed shards (policy, critic) and rank 0 the loop's state, and all report them as one
checkpoint. When a worker dies Ray Train restarts the group, :func:`train_loop` restores
the last checkpoint and pushes its weights to the rollout actors (which outlive the group),
and the run goes on; a rerun with the same run name resumes the same way. The end of the
run is a checkpoint too, with the HF export in ``hf/`` and ``final.json``: a rerun of a
finished run returns at once, one with more ``algo.iterations`` continues from the end.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from raystages.rl.algos import AdaptiveKLController, FixedKLController
from raystages.rl.batch import RunningMoments, advantages, collate, health, shape_scores, split_rows
from raystages.rl.rewards import TextRewards, oracle_scores
from raystages.train import engine
from raystages.train.metrics import say

LOOP_STATE = "loop.json"  # in every checkpoint, next to the DeepSpeed state


@dataclass
class LoopState:
    """What a resumed run needs besides the DeepSpeed state. Rank 0's is the one saved; the
    other ranks keep ``iteration`` and ``version`` up to date and nothing else."""

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
    learner: object  # this rank's Learner
    sync: object  # WeightSync
    pool: object | None  # RolloutPool on rank 0 (the controller), None on the other ranks
    prompts: list  # train prompt texts
    eval_prompts: list
    hooks: dict = field(default_factory=dict)  # event name -> fn(ctx, iteration), on rank 0; for tests and tools
    resumed_from: int | None = None  # the restored checkpoint's iteration, until the next one is logged

    @property
    def controller(self) -> bool:
        return self.learner.rank == 0


def train_loop(config: dict) -> None:
    """The Ray Train worker function, on every rank: resume or start, train, finish.

    ``config``: ``spec``, ``pool`` (the driver's RolloutPool), ``prompts``, ``eval_prompts``,
    ``tokenizer_dir``, ``run_dir``, ``hooks``.
    """
    import ray.train

    from raystages.models import load_tokenizer
    from raystages.rl.learner import Learner
    from raystages.rl.sync import WeightSync
    from raystages.train.metrics import MetricsLog

    spec = config["spec"]
    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint and _report_if_ended(checkpoint, spec, rank):
        return
    device = ray.train.torch.get_device() if spec.scaling.use_gpu else torch.device("cpu")
    learner = Learner(spec, rank, world, device)
    pool = config["pool"] if rank == 0 else None
    ctx = Context(spec, load_tokenizer(config["tokenizer_dir"], spec.model.trust_remote_code), learner,
                  WeightSync(learner, pool), pool, config["prompts"], config["eval_prompts"], config.get("hooks") or {})
    state = restore(ctx, checkpoint) if checkpoint else LoopState(kl_coef=spec.kl.coef)
    # The actors may hold another attempt's weights (after a restart or a rerun): give them
    # this attempt's, under the version they were saved as.
    ctx.sync.push(state.version)
    log = None
    if rank == 0:
        log = MetricsLog(Path(config["run_dir"]), spec.algo.iterations, spec.logging.tensorboard, "tok")
    result = train(ctx, state, log)
    save_checkpoint(ctx, state, result["last"], final=result)
    if log:
        log.close()


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


def _flat(metrics: dict) -> dict:
    """The scalars of ``metrics``: what Ray Train keeps with a checkpoint."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


def save_checkpoint(ctx: Context, state: LoopState, metrics: dict, final: dict | None = None) -> None:
    """Collective. Every rank saves its DeepSpeed shards, rank 0 adds the loop state (and,
    ``final`` given, the HF export and the final marker), through the engine's one path."""
    def write(tmp: Path) -> None:
        ctx.learner.save(str(tmp))
        if final is not None:
            ctx.learner.export(str(tmp / engine.EXPORT_SUBDIR), ctx.tokenizer)
        if ctx.controller:
            (tmp / LOOP_STATE).write_text(json.dumps(asdict(state)))
            if final is not None:
                (tmp / engine.FINAL_MARKER).write_text(json.dumps(final, default=str))

    engine.report_checkpoint(_flat(metrics) | {"iteration": state.iteration}, write)


def restore(ctx: Context, checkpoint) -> LoopState:
    """Collective. Every rank loads the DeepSpeed state and the loop state of ``checkpoint``."""
    with checkpoint.as_directory() as d:
        ctx.learner.load(d)
        state = LoopState(**json.loads((Path(d) / LOOP_STATE).read_text()))
    ctx.resumed_from = state.iteration
    if ctx.controller:
        say(f"resumed from iteration {state.iteration} ({checkpoint.path})")
    return state


def _report_if_ended(checkpoint, spec, rank: int) -> bool:
    """When ``checkpoint`` is the final one of a run that ended (all its iterations, or a
    limit aborted it), report it again so the driver gets its export, and return True. Every
    rank reads the same marker, so all take the same branch."""
    final = engine.final_of(checkpoint)
    if final is None or (final["iterations"] < spec.algo.iterations and not final["aborted"]):
        return False  # not ended, or more iterations asked for: continue from the end
    if rank == 0:
        say(f"this run already ended at iteration {final['iterations']}; returning its final checkpoint")
    engine.report_final(checkpoint, _flat(final["last"]) | {"iteration": final["iterations"]}, rank)
    return True


def _plan(ctx: Context, batch: dict, texts: list[str], gens, kl, moments: RunningMoments) -> tuple[dict, dict]:
    """Controller: score the responses, then advantages, health and limits. Returns what every
    rank needs for the update — ``advantages`` (and PPO ``returns``) ``(B, L-1)``,
    ``kl_coef``, ``aborted`` (None or why) — and the iteration's metrics so far."""
    spec = ctx.spec
    responses = [ctx.tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in gens]
    scores, metrics = score(ctx, batch, texts, responses)
    adv = advantages(spec, batch, shape_scores(scores, spec.algo, moments), kl.value)
    h = health(batch | adv)
    return {"advantages": adv, "kl_coef": kl.value, "aborted": _check_limits(spec, h)}, metrics | h


def _record(ctx: Context, state: LoopState, kl, moments: RunningMoments, metrics: dict, log) -> None:
    """Controller: the loop state to checkpoint, metrics.jsonl and the progress line."""
    state.kl_coef = kl.value
    state.moments = [moments.n, moments.mean, moments.m2]
    state.history.append({k: metrics[k] for k in ("iteration", "reward", "kl_ref", "response_len") if k in metrics}
                         | ({"reward_oracle": metrics["reward_oracle"]} if "reward_oracle" in metrics else {}))
    if log:
        log.log(state.iteration, metrics)
    say(f"iter {state.iteration}/{ctx.spec.algo.iterations} | reward {metrics['reward']:.3f}"
        + (f" | oracle {metrics['reward_oracle']:.3f}" if "reward_oracle" in metrics else "")
        + f" | kl {metrics['kl_ref']:.3f} | len {metrics['response_len']:.1f} | gap {metrics['logprob_gap_mean']:.1e}"
        + f" | clip {metrics.get('clip_frac', 0):.2f} | {metrics['iteration_s']:.1f}s")


def train(ctx: Context, state: LoopState, log=None) -> dict:
    """Iterations ``state.iteration + 1 .. algo.iterations``, on every rank; rank 0 also
    evaluates before and after. Returns the run's result (complete on rank 0)."""
    spec, a, learner = ctx.spec, ctx.spec.algo, ctx.learner
    kl = (AdaptiveKLController(state.kl_coef, spec.kl.target, spec.kl.horizon) if spec.kl.adaptive
          else FixedKLController(state.kl_coef))
    moments = RunningMoments()
    moments.n, moments.mean, moments.m2 = state.moments
    if ctx.controller and not state.before:
        state.before = evaluate(ctx)
        say(f"before: {state.before}")
    aborted, metrics = None, {}
    pending = submit(ctx, state.iteration) if ctx.controller and state.iteration < a.iterations else None
    while state.iteration < a.iterations:
        it, version, t0 = state.iteration, state.version, time.perf_counter()
        gens = texts = None
        if ctx.controller:
            texts, work = pending
            gens = ctx.pool.collect(work)
            pending = None
            if a.one_step_off_policy and it + 1 < a.iterations:
                pending = submit(ctx, it + 1)  # generated with the current weights, during the update
        t_gen = time.perf_counter() - t0
        # The controller holds the whole batch; every other rank only its own rows.
        full = collate(gens, ctx.tokenizer.pad_token_id) if ctx.controller else None
        batch = learner.scatter(split_rows(full, learner.world) if ctx.controller else None)
        computed = learner.compute(batch)
        batch.update(computed)
        parts = learner.gather(computed)
        t_compute = time.perf_counter() - t0 - t_gen
        plans, metrics = None, {}
        if ctx.controller:
            full.update({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
            plan, metrics = _plan(ctx, full, texts, gens, kl, moments)
            plans = [plan | {"advantages": rows} for rows in split_rows(plan["advantages"], learner.world)]
        plan = learner.scatter(plans)
        batch.update(plan["advantages"])
        t1 = time.perf_counter()
        stats = learner.update(batch, plan["kl_coef"], it)
        t_update = time.perf_counter() - t1
        metrics |= stats | ctx.sync.sync()
        engine.return_free_memory()  # before the next iteration's rollouts and forward passes
        metrics["rank_peak_rss_mb"] = learner.peak_rss_mb()
        state.iteration, state.version = it + 1, ctx.sync.version
        if ctx.controller:
            kl.update(metrics["kl_ref_k1"], len(gens))
            metrics |= {"iteration": it + 1, "kl_coef": kl.value, "gen_s": t_gen,
                        "stale_rollouts": sum(g.version != version for g in gens),
                        "gen_tokens_per_s": full["response_len"].sum().item() / max(t_gen, 1e-9),
                        "compute_s": t_compute, "update_s": t_update, "iteration_s": time.perf_counter() - t0,
                        "actor_restarts": ctx.pool.restarts}
            if ctx.resumed_from is not None:
                metrics["resumed_from"], ctx.resumed_from = ctx.resumed_from, None
            _record(ctx, state, kl, moments, metrics, log)
        if plan["aborted"]:
            aborted = plan["aborted"]
            if ctx.controller:
                say(f"aborting: {aborted}")
            break
        if state.iteration % spec.run.checkpoint_every == 0 and state.iteration < a.iterations:
            save_checkpoint(ctx, state, metrics)
        if ctx.controller and pending is None and state.iteration < a.iterations:
            pending = submit(ctx, state.iteration)
    after = {}
    if ctx.controller:
        after = evaluate(ctx)
        say(f"after: {after}")
    last = metrics or (state.history[-1] if state.history else {})
    return {"before": state.before, "after": after, "aborted": aborted, "iterations": state.iteration,
            "last": last, "history": state.history, "actor_restarts": ctx.pool.restarts if ctx.pool else 0}
