"""SFT throughput: one example per padded row vs several packed per block, side by side.

Both runs fine-tune the same fresh checkpoint (a ``model.preset`` Llama with a tokenizer
trained on the built-in corpus) on the built-in chat split with the same spec; only
``sft.packing`` differs. Figures are steady state (windows after ``warmup`` steps).

    raystages bench sft [optim.max_steps=80 scaling.num_workers=2 model.preset=tiny ...]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

WARMUP_STEPS = 20


def fresh_checkpoint(preset: str, out: Path) -> str:
    """An untrained ``preset`` model + the built-in tokenizer, exported as a checkpoint."""
    from raystages.models import build_causal_lm, export_hf, train_tokenizer
    from raystages.spec import ModelSpec
    from raystages.task.splits import pretrain_texts

    tok = train_tokenizer(pretrain_texts("train", 300), 512, out / "tokenizer")
    export_hf(build_causal_lm(ModelSpec(preset=preset), tok, seed=0), tok, out / "model")
    return str(out / "model")


def split_preset(overrides: list[str], default: str = "tiny") -> tuple[str, list[str]]:
    presets = [o.split("=", 1)[1] for o in overrides if o.startswith("model.preset=")]
    return (presets[-1] if presets else default), [o for o in overrides if not o.startswith("model.preset=")]


def steady_throughput(run_dir: Path) -> float:
    """Items/s after warm-up: windows are equal-length, so the harmonic mean is items / time."""
    logged = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [m["throughput"] for m in logged if m["step"] > WARMUP_STEPS and "throughput" in m]
    if not steady:
        raise ValueError(f"bench: optim.max_steps must exceed {WARMUP_STEPS} + logging.log_every")
    return len(steady) / sum(1 / t for t in steady)


def run(overrides: list[str]) -> dict:
    from raystages.spec import load_spec
    from raystages.stages import sft

    preset, overrides = split_preset(overrides)
    storage = Path(tempfile.mkdtemp(prefix="raystages-bench-sft-"))
    checkpoint = fresh_checkpoint(preset, storage / "fresh")
    out = {"model_preset": preset}
    for mode in ("padding", "packing"):
        spec = load_spec(None, [
            f"model.path={checkpoint}", "optim.max_steps=80", "optim.micro_batch_size=16",
            "optim.seq_len=128", "optim.warmup_steps=10", "data.builtin.num_train=3000",
            f"run.storage_path={storage}", f"run.name=bench-{mode}", "run.eval_every=100000",
            "run.checkpoint_every=100000", "run.samples=0", "sft.eval_prompts=0",
            f"logging.log_every={WARMUP_STEPS // 2}", "logging.tensorboard=false", *overrides,
            f"sft.packing={mode == 'packing'}"], stage="sft")
        t0 = time.perf_counter()
        result = sft.run(spec)
        m = result.metrics
        supervised = steady_throughput(result.run_dir)
        out[mode] = {
            "supervised_tokens_per_s": round(supervised),
            # Every real token (prompt + answer) goes through forward and backward.
            "tokens_per_s": round(supervised * m["train_tokens"] / m["train_supervised_tokens"]),
            "examples_per_s": round(supervised * m["train_examples"] / m["train_supervised_tokens"], 1),
            "wall_s_including_startup": round(time.perf_counter() - t0, 1),
        }
    out["steps"] = spec.optim.max_steps
    out["workers"] = spec.scaling.num_workers
    out["zero_stage"] = spec.deepspeed.zero_stage
    out["packing_over_padding_tokens_per_s"] = round(
        out["packing"]["tokens_per_s"] / out["padding"]["tokens_per_s"], 3)
    return out
