"""Rank-0 metrics: progress lines, metrics.jsonl, TensorBoard, throughput and MFU."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

# Dense bf16 peak TFLOP/s per device, for MFU. CPUs have no meaningful single figure:
# set logging.peak_tflops to get MFU there.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def say(line: str) -> None:
    """One progress line. Not ``print``: Ray Train patches it into a logger that the
    driver shows twice."""
    sys.stdout.write(f"[raystages] {line}\n")
    sys.stdout.flush()


def peak_tflops(spec) -> float | None:
    if spec.logging.peak_tflops:
        return spec.logging.peak_tflops
    import torch

    if spec.scaling.use_gpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def flops_per_token(model_config, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus attention scores (PaLM, App. B)."""
    layers = getattr(model_config, "num_hidden_layers", 0)
    hidden = getattr(model_config, "hidden_size", 0)
    return 6 * n_params + 12 * layers * hidden * seq_len


class MetricsLog:
    def __init__(self, run_dir: Path, max_steps: int, tensorboard: bool, unit: str):
        self.path = run_dir / "metrics.jsonl"
        self.max_steps = max_steps
        self.unit = unit
        self.t0 = time.time()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        with self.path.open("a") as f:
            # The step last: ``metrics`` may still carry the step of the last progress line.
            f.write(json.dumps({**metrics, "step": step, "time": time.time()}) + "\n")
        if self.writer:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def progress(self, step: int, start_step: int, metrics: dict) -> None:
        elapsed = time.time() - self.t0
        done = step - start_step
        eta = elapsed / done * (self.max_steps - step) if done else 0.0
        parts = [f"step {step}/{self.max_steps}"]
        for key in ("loss", "val_loss", "lr"):
            if key in metrics:
                parts.append(f"{key} {metrics[key]:.4g}")
        if "throughput" in metrics:
            parts.append(f"{metrics['throughput']:,.0f} {self.unit}/s")
        if "mfu" in metrics:
            parts.append(f"mfu {metrics['mfu']:.1%}")
        parts.append(f"eta {int(eta // 60)}m{int(eta % 60):02d}s")
        say(" | ".join(parts))

    def close(self) -> None:
        if self.writer:
            self.writer.close()
