"""Stage 4 — RL: PPO (with a critic), GRPO or RLOO from an SFT policy, on Ray.

    raystages rl jobs/grpo.yaml model.path=runs/sft/model [algo.iterations=30 ...]
    raystages rl jobs/rl.yaml            # PPO with a critic

The driver starts the rollout actors (vLLM, or transformers: :class:`RolloutPool`) and then
fits a Ray Train ``TorchTrainer`` whose workers are the learner: one DeepSpeed data-parallel
rank each, holding the policy and the critic, all running the loop of
:mod:`raystages.rl.loop`. Rank 0 is the controller — it drives the rollout actors, scores and
computes advantages — and after each update the new weights are synced to every actor. The
driver owns the actors, so they outlive a learner group that Ray Train restarts from its last
checkpoint after a worker dies. The tuned policy is exported as a Hugging Face checkpoint in
``run_dir/model`` with ``lineage.json`` pointing at the SFT parent; ``summary.json`` holds the
reward before/after and per-iteration health.
"""

from __future__ import annotations

import time

from raystages.preflight import preflight as preflight_checks
from raystages.resources import check_cluster


def load_prompts(spec) -> tuple[list[str], list[str], list[str]]:
    """(train prompts, held-out prompts, skipped-row notes), read before Ray starts."""
    d, r = spec.data, spec.rollout
    if d.source == "builtin":
        from raystages.task.splits import rl_prompts

        b = d.builtin
        lengths = {"min_len": b.min_len, "max_len": b.max_len}
        return ([x["prompt"] for x in rl_prompts("train", b.num_train, b.seed, **lengths)],
                [x["prompt"] for x in rl_prompts("val", min(b.num_val, r.eval_prompts), b.seed, **lengths)], [])
    from raystages.data.sources import read_rows, text_of

    rows = read_rows(d.source, text_of(d.text_field), d.on_bad_row, d.max_rows, d.hub_split)
    skipped = list(rows.skipped)
    if d.val_source:
        val = read_rows(d.val_source, text_of(d.text_field), d.on_bad_row, d.max_rows, d.hub_split)
        return rows.rows, val.rows[:r.eval_prompts], skipped + val.skipped
    return rows.rows, rows.rows[:r.eval_prompts], skipped


def preflight(spec, produced: frozenset[str]) -> list[str]:
    """RL's checks where the job runs (see ``raystages.preflight``): the rollout engine is
    installed, callable rewards import, reward models are checkpoints with the policy's
    tokenizer unless ``reward.retokenize``."""
    import importlib.util

    from raystages.models import tokenizer_digest
    from raystages.preflight import checkpoint_problem
    from raystages.rl.rewards import load_callable

    out = []
    if spec.rollout.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        out.append("rollout.engine: vllm is not installed here; use 'hf' or 'auto'")
    for i, s in enumerate(spec.reward.sources):
        where = f"reward.sources.{i}.ref"
        if s.kind == "callable":
            try:
                if not callable(load_callable(s.ref)):
                    out.append(f"{where}: {s.ref!r} is not callable")
            except (ImportError, AttributeError) as e:
                out.append(f"{where}: cannot load {s.ref!r}: {e}")
        elif s.kind == "model" and "reward.sources" not in produced:
            problem = checkpoint_problem(where, s.ref, "a reward-model checkpoint")
            ours = theirs = None
            if not problem and not spec.reward.retokenize and "model.path" not in produced:
                ours, theirs = tokenizer_digest(spec.model.path), tokenizer_digest(s.ref)
            if problem:
                out.append(problem)
            elif None not in (ours, theirs) and ours != theirs:
                out.append(f"{where}: reward model {s.ref!r} has a different tokenizer than the policy "
                           f"{spec.model.path!r}: set reward.retokenize=true to score with its own")
    return out


def _before_after(before: dict, after: dict) -> dict:
    """``reward_before``/``reward_after`` (greedy; the oracle when the prompts are task
    prompts, else the summed text reward), ``accuracy_before``/``accuracy_after`` (greedy
    exact match, by the oracle) and their sampled counterparts."""
    out = {}
    for prefix in ("", "sampled_"):
        keys = [f"{prefix}reward_oracle"] + sorted(k for k in before if k.startswith(f"{prefix}reward_"))
        key = next((k for k in keys if k in before), None)
        if key:
            out[f"{prefix}reward_before"], out[f"{prefix}reward_after"] = before[key], after.get(key)
        if f"{prefix}accuracy" in before:
            out[f"{prefix}accuracy_before"], out[f"{prefix}accuracy_after"] = (before[f"{prefix}accuracy"],
                                                                             after.get(f"{prefix}accuracy"))
    return out


def _fit(spec, pool, prompts, eval_prompts, tokenizer_dir: str, hooks: dict):
    """Fit the learner with the one engine: ``scaling.num_workers`` Ray Train workers running
    :func:`raystages.rl.loop.train_loop`. Returns Ray Train's ``Result``."""
    from raystages.rl.loop import train_loop
    from raystages.train import engine

    config = {"spec": spec, "pool": pool, "prompts": prompts, "eval_prompts": eval_prompts,
              "tokenizer_dir": tokenizer_dir, "hooks": hooks}
    return engine.fit(spec, train_loop, config, "rl", spec.algo.iterations)


def run(spec, hooks: dict | None = None):
    """Run the stage. ``hooks``: ``{"before_submit": fn(ctx, iteration)}``, called on learner
    rank 0 inside its Ray Train worker before each batch's rollouts (tests inject faults with
    it); ``fn`` travels by pickle, so it must not hold locks, open files or the like."""
    from raystages.data.tokenizer import prepare_tokenizer
    from raystages.models import context_length, load_tokenizer
    from raystages.rl.actor import RolloutPool
    from raystages.rl.loop import encode
    from raystages.spec import SpecError
    from raystages.train import engine
    from raystages.train.runner import EXPORT_DIR, connect_ray, finish_stage, save_run_spec

    started = time.time()
    preflight_checks(spec)
    prompts, eval_prompts, skipped = load_prompts(spec)
    save_run_spec(spec)
    run_dir = spec.run_dir()
    tokenizer_dir = prepare_tokenizer(spec, [])
    tok = load_tokenizer(tokenizer_dir)
    longest = max(len(ids) for ids in encode(tok, prompts[:2000] + eval_prompts))
    ctx_len = context_length(None, spec.model.path, spec.model.config_overrides) or 10**9
    if longest + spec.rollout.max_new_tokens > ctx_len:
        raise SpecError(f"rollout.max_new_tokens: prompts of {longest} tokens + {spec.rollout.max_new_tokens} "
                        f"new tokens exceed the policy's context of {ctx_len}")
    connect_ray()
    check_cluster(spec)
    kind = spec.rollout_engine()
    r = spec.rollout
    engine_kwargs = {"seed": spec.run.seed, "kv_cache_mb": r.kv_cache_mb} if kind == "vllm" else {"seed": spec.run.seed}
    if kind == "vllm":
        engine_kwargs["max_model_len"] = min(ctx_len, longest + r.max_new_tokens)
    # Owned by the driver: the actors outlive a learner group that Ray Train restarts.
    pool = RolloutPool(kind, spec.model.path, r.num_actors, engine_kwargs, r.cpus_per_actor,
                       r.gpus_per_actor, r.max_restarts)
    try:
        fit = _fit(spec, pool, prompts, eval_prompts, str(tokenizer_dir), hooks or {})
    finally:
        pool.shutdown()
    export = run_dir / EXPORT_DIR
    result = engine.collect(fit, export, "rl")
    metrics = {"algo": spec.algo.name, "engine": kind, "iterations": result["iterations"],
               "aborted": result["aborted"], "actor_restarts": result["actor_restarts"],
               **_before_after(result["before"], result["after"]),
               "wall_s": time.time() - started}
    metrics |= {k: v for k, v in result["last"].items() if isinstance(v, (int, float))
                and k in ("reward", "reward_oracle", "kl_ref", "response_len", "logprob_gap_mean", "sync_bytes_per_s")}
    return finish_stage(spec, export, metrics, spec.model.path, skipped,
                        extra={"checkpoint": fit.checkpoint.path, "before": result["before"],
                               "after": result["after"], "history": result["history"]})
