"""Stage 4 — RL: PPO (with a critic), GRPO or RLOO from an SFT policy, on Ray.

    raystages rl jobs/grpo.yaml model.path=runs/sft/model [algo.iterations=30 ...]
    raystages rl jobs/rl.yaml            # PPO with a critic

Rollout actors (vLLM, or transformers) sample responses; a DeepSpeed learner (Ray actors,
one per data-parallel rank) recomputes log-probs, scores, and updates policy and critic; the
new weights are synced to every actor after each update. The tuned policy is exported as a
Hugging Face checkpoint in ``run_dir/model`` with ``lineage.json`` pointing at the SFT
parent; ``summary.json`` holds the reward before/after and per-iteration health.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


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


def _check_resources(spec) -> None:
    """Fail now, not after a 5-minute rendezvous timeout, when the learner and rollout actors
    cannot all be placed at once (each learner rank waits for the others in its setup)."""
    import ray

    s, r = spec.scaling, spec.rollout
    need = {"CPU": s.num_workers * s.cpus_per_worker + r.num_actors * r.cpus_per_actor,
            "GPU": s.num_workers * (s.gpus_per_worker if s.use_gpu else 0) + r.num_actors * r.gpus_per_actor}
    have = ray.cluster_resources()
    for res, amount in need.items():
        if amount > have.get(res, 0) + 1e-9:
            raise RuntimeError(
                f"rl needs {amount:g} {res} at once ({s.num_workers} learner workers x scaling.cpus_per_worker / "
                f"gpus_per_worker + {r.num_actors} rollout actors x rollout.cpus_per_actor / gpus_per_actor) but the "
                f"Ray cluster has {have.get(res, 0):g}: lower those (fractions are fine) or add nodes")


def _before_after(before: dict, after: dict) -> dict:
    """``reward_before``/``reward_after`` (greedy; the oracle when the prompts are task
    prompts, else the summed text reward) and their sampled counterparts."""
    out = {}
    for prefix in ("", "sampled_"):
        keys = [f"{prefix}reward_oracle"] + sorted(k for k in before if k.startswith(f"{prefix}reward_"))
        key = next((k for k in keys if k in before), None)
        if key:
            out[f"{prefix}reward_before"], out[f"{prefix}reward_after"] = before[key], after.get(key)
    return out


def run(spec, hooks: dict | None = None):
    from raystages.data.tokenizer import prepare_tokenizer
    from raystages.models import context_length, load_tokenizer
    from raystages.rl.actor import RolloutPool
    from raystages.rl.learner import LearnerGroup
    from raystages.rl.loop import Context, encode, train
    from raystages.rl.sync import WeightSync
    from raystages.spec import SpecError
    from raystages.train.metrics import MetricsLog
    from raystages.train.runner import EXPORT_DIR, StageResult, connect_ray, save_run_spec, write_lineage

    started = time.time()
    if not (Path(spec.model.path) / "config.json").is_file():
        raise SpecError(f"model.path: {spec.model.path!r} is not a checkpoint directory "
                        "(run the SFT stage first, or point it at one)")
    for s in spec.reward.sources:
        if s.kind == "model" and not (Path(s.ref) / "config.json").is_file():
            raise SpecError(f"reward.sources: reward model {s.ref!r} is not a checkpoint directory")
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
    _check_resources(spec)
    kind = spec.rollout_engine()
    r = spec.rollout
    engine_kwargs = {"seed": spec.run.seed, "kv_cache_mb": r.kv_cache_mb} if kind == "vllm" else {"seed": spec.run.seed}
    if kind == "vllm":
        engine_kwargs["max_model_len"] = min(ctx_len, longest + r.max_new_tokens)
    pool = RolloutPool(kind, spec.model.path, r.num_actors, engine_kwargs, r.cpus_per_actor,
                       r.gpus_per_actor, r.max_restarts)
    learner = LearnerGroup(spec)
    try:
        ctx = Context(spec, tok, pool, learner, WeightSync(learner, pool), prompts, eval_prompts, hooks or {})
        log = MetricsLog(run_dir, spec.algo.iterations, spec.logging.tensorboard, "tok")
        result = train(ctx, run_dir, log)
        log.close()
        export = run_dir / EXPORT_DIR
        learner.export(str(export), tokenizer_dir)
    finally:
        learner.shutdown()
        pool.shutdown()
    metrics = {"algo": spec.algo.name, "engine": kind, "iterations": result["iterations"],
               "aborted": result["aborted"], "actor_restarts": result["actor_restarts"],
               **_before_after(result["before"], result["after"]),
               "wall_s": time.time() - started}
    metrics |= {k: v for k, v in result["last"].items() if isinstance(v, (int, float))
                and k in ("reward", "reward_oracle", "kl_ref", "response_len", "logprob_gap_mean", "sync_bytes_per_s")}
    write_lineage(spec, export, metrics, parent=spec.model.path)
    summary = {"stage": "rl", "export": str(export), "metrics": metrics, "before": result["before"],
               "after": result["after"], "history": result["history"], "skipped": skipped[:20]}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return StageResult("rl", run_dir, export, metrics)
