"""``raystages bench memory``: does the RL learner's memory per rank shrink as the group grows?

    raystages bench memory [hidden=768 layers=7 iterations=3 batch=16 sync_bucket_mb=16 ...]

Builds a Llama policy of about 50M parameters locally (``hidden``/``layers``/``intermediate``)
and a reward model on the same weights, then runs the real RL stage — PPO with a critic
(from the reward model), ZeRO-3, a reference policy and a reward model held as the engine's
frozen models — at 1 and at 2 learner workers, one after the other in this invocation.
Every iteration records the largest peak resident memory of any learner rank
(``rank_peak_rss_mb``) and rank 0's heap growth inside the weight sync's bucket gathers
(``sync_extra_peak_mb``). Prints one JSON object: ``per_rank_peak_rss_mb`` per world size,
``ratio_2_over_1`` (target <= 0.65), ``sync_extra_peak_mb`` with ``sync_bucket_mb``
(target <= 2 x bucket) and the median ``iteration_s`` per world size.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from raystages.spec import parse_options

DEFAULTS = {"hidden": 768, "layers": 7, "intermediate": 2048, "heads": 12, "iterations": 3, "batch": 16,
            "micro_batch_size": 4, "max_new_tokens": 16, "sync_bucket_mb": 16.0}


def _peaks(run_dir: Path) -> tuple[float, list[float], float]:
    """The run's largest ``rank_peak_rss_mb``, its ``sync_extra_peak_mb`` per iteration and
    its median seconds per iteration."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return (max(r["rank_peak_rss_mb"] for r in rows), [round(r["sync_extra_peak_mb"], 1) for r in rows],
            round(statistics.median(r["iteration_s"] for r in rows), 2))


def run(overrides: list[str] | None = None) -> dict:
    from raystages.bench.rl import _models, ppo_spec
    from raystages.models import count_parameters
    from raystages.stages import rl
    from raystages.train.runner import connect_ray

    o = parse_options(list(overrides or []), DEFAULTS, "bench memory")
    shape = {"hidden_size": o["hidden"], "num_hidden_layers": o["layers"], "intermediate_size": o["intermediate"],
             "num_attention_heads": o["heads"], "num_key_value_heads": o["heads"]}
    out: dict = {"options": o, "per_rank_peak_rss_mb": {}, "sync_extra_peak_mb": {}}
    with tempfile.TemporaryDirectory(prefix="raystages-bench-memory-") as tmp:
        work = Path(tmp)
        policy, rm = _models(work, "small", shape)
        from transformers import AutoModelForCausalLM

        out["params"] = count_parameters(AutoModelForCausalLM.from_pretrained(policy))
        connect_ray()
        for world in (1, 2):
            spec = ppo_spec(policy, rm, work, {"batch": o["batch"], "micro_batch_size": o["micro_batch_size"],
                                                 "max_new_tokens": o["max_new_tokens"], "iterations": o["iterations"],
                                                 "ppo_epochs": 1, "off_policy": False, "num_workers": world,
                                                 "zero_stage": 3},
                            rollout={"engine": "hf", "sync_bucket_mb": o["sync_bucket_mb"]}, name=f"bench-memory-{world}")
            rss, extra, seconds = _peaks(rl.run(spec).run_dir)
            out.setdefault("iteration_s", {})[str(world)] = seconds
            out["per_rank_peak_rss_mb"][str(world)] = round(rss, 1)
            out["sync_extra_peak_mb"][str(world)] = max(extra)
            out.setdefault("sync_extra_peak_mb_by_iteration", {})[str(world)] = extra
    peaks = out["per_rank_peak_rss_mb"]
    out["ratio_2_over_1"] = round(peaks["2"] / peaks["1"], 3)
    out["sync_bucket_mb"] = o["sync_bucket_mb"]
    worst_sync = max(out["sync_extra_peak_mb"].values())
    out["targets"] = {"ratio_2_over_1 <= 0.65": out["ratio_2_over_1"] <= 0.65,
                      "sync_extra_peak_mb <= 2 x bucket": worst_sync <= 2 * o["sync_bucket_mb"]}
    return out
