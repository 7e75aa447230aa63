"""Pretraining throughput: raystages on 1 Ray Train worker vs a bare PyTorch loop.

Same model (preset, seed), same packed blocks, same batch, optimizer (AdamW) and schedule.
Both are timed in steady state (after ``warmup`` steps), so the figure compares the
training loops, not Ray's fixed start-up cost, which is reported separately.

    raystages bench pretrain [optim.max_steps=120 model.preset=tiny ...]
"""

from __future__ import annotations

import json
import math
import tempfile
import time

WARMUP_STEPS = 20


def cached_blocks(spec, tokenizer_dir: str):
    """The run's packed training blocks, read from its token cache: ``(N, seq_len)`` int64."""
    import numpy as np
    import pyarrow.parquet as pq

    from raystages.data import token_cache

    cache = token_cache.lookup(token_cache.cache_root(spec), token_cache.cache_key(spec, tokenizer_dir)[0])
    return np.concatenate([np.stack(pq.read_table(f)["input_ids"].to_numpy(zero_copy_only=False))
                           for f in cache.files("train")]).astype(np.int64)


def _bare_loop(spec, tokenizer_dir: str) -> float:
    """Tokens/s of a plain single-process loop over the same blocks."""
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from raystages.models import build_causal_lm, load_tokenizer
    from raystages.train.optim import lr_lambda

    torch.set_num_threads(max(1, math.ceil(spec.scaling.cpus_per_worker)))
    tok = load_tokenizer(tokenizer_dir)
    blocks = torch.from_numpy(cached_blocks(spec, tokenizer_dir))
    g = torch.Generator().manual_seed(spec.run.seed)
    blocks = blocks[torch.randperm(len(blocks), generator=g)]
    model = build_causal_lm(spec.model, tok, spec.run.seed).train()
    o = spec.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    sched = LambdaLR(opt, lr_lambda(o))
    mbs, n = o.micro_batch_size, len(blocks) // o.micro_batch_size
    t0 = None
    for step in range(o.max_steps):
        if step == WARMUP_STEPS:
            t0 = time.perf_counter()
        for _ in range(o.grad_accum):
            i = (step * o.grad_accum) % n
            ids = blocks[i * mbs:(i + 1) * mbs]
            (model(input_ids=ids, labels=ids).loss / o.grad_accum).backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    steps = o.max_steps - WARMUP_STEPS
    return steps * o.grad_accum * mbs * o.seq_len / (time.perf_counter() - t0)


def run(overrides: list[str]) -> dict:
    from raystages.spec import load_spec
    from raystages.stages import pretrain

    storage = tempfile.mkdtemp(prefix="raystages-bench-")
    spec = load_spec(None, [
        "model.preset=tiny", "optim.max_steps=120", "optim.micro_batch_size=16",
        "optim.seq_len=128", "scaling.num_workers=1", "scaling.cpus_per_worker=2",
        "deepspeed.zero_stage=0", f"run.storage_path={storage}", "run.name=bench",
        "run.eval_every=100000", "run.checkpoint_every=100000", "run.samples=0",
        f"logging.log_every={WARMUP_STEPS}", "logging.tensorboard=false", *overrides], stage="pretrain")
    t0 = time.perf_counter()
    result = pretrain.run(spec)
    ray_wall = time.perf_counter() - t0
    logged = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [m for m in logged if m["step"] > WARMUP_STEPS and "throughput" in m]
    # Windows are equal-length (log_every steps), so the harmonic mean is total tokens / time.
    ray_tps = len(steady) / sum(1 / m["throughput"] for m in steady)
    bare_tps = _bare_loop(spec, str(result.run_dir / "tokenizer"))
    return {
        "model_params": result.metrics.get("params"),
        "steps": spec.optim.max_steps, "warmup_steps_excluded": WARMUP_STEPS,
        "tokens_per_step": spec.optim.micro_batch_size * spec.optim.grad_accum * spec.optim.seq_len,
        "raystages_tokens_per_s": round(ray_tps),
        "bare_pytorch_tokens_per_s": round(bare_tps),
        "ratio_raystages_over_bare": round(ray_tps / bare_tps, 3),
        "target_ratio": 0.95,
        "raystages_wall_s_including_startup": round(ray_wall, 1),
    }
