"""Reward-model throughput: preference pairs/s (and tokens/s) on Ray Train + DeepSpeed.

Trains a scalar head on a fresh ``model.preset`` checkpoint over the built-in task's
preference pairs; figures are steady state (windows after the warm-up steps).

    raystages bench rm [optim.max_steps=80 scaling.num_workers=2 model.preset=tiny ...]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from raystages.bench.sft import WARMUP_STEPS, fresh_checkpoint, split_preset, steady_throughput


def run(overrides: list[str]) -> dict:
    from raystages.spec import load_spec
    from raystages.stages import rm

    preset, overrides = split_preset(overrides)
    storage = Path(tempfile.mkdtemp(prefix="raystages-bench-rm-"))
    checkpoint = fresh_checkpoint(preset, storage / "fresh")
    spec = load_spec(None, [
        f"model.path={checkpoint}", "optim.max_steps=80", "optim.micro_batch_size=16",
        "optim.seq_len=64", "optim.warmup_steps=10", "data.builtin.num_train=3000",
        f"run.storage_path={storage}", "run.name=bench-rm", "run.eval_every=100000",
        "run.checkpoint_every=100000", f"logging.log_every={WARMUP_STEPS // 2}",
        "logging.tensorboard=false", *overrides], stage="rm")
    t0 = time.perf_counter()
    result = rm.run(spec)
    m = result.metrics
    pairs = steady_throughput(result.run_dir)
    return {
        "model_preset": preset, "steps": spec.optim.max_steps, "workers": spec.scaling.num_workers,
        "zero_stage": spec.deepspeed.zero_stage,
        "pairs_per_s": round(pairs, 1),
        "tokens_per_s": round(pairs * m["train_tokens"] / m["train_pairs"]),
        "wall_s_including_startup": round(time.perf_counter() - t0, 1),
    }
