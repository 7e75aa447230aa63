"""Serving throughput: requests/s and latency at concurrency 1 and 32, same checkpoint and
prompt mix, over real HTTP on loopback; the ratio of the two throughputs shows batching.

    raystages bench serve [checkpoint=runs/pretrain/model engine=vllm max_tokens=32 requests=512]

Without ``checkpoint`` a fresh ``tiny``-preset model with the built-in tokenizer is used
(greedy decoding, so both concurrency levels do the same work). Target: ratio >= 5.
"""

from __future__ import annotations

import asyncio
import tempfile
import time

DEFAULTS = {"checkpoint": None, "engine": "auto", "max_tokens": 32, "requests": 512, "requests_1": 48,
            "concurrency": 32, "port": 8123, "cpus": 1.0, "preset": "tiny", "batch_wait_ms": 20.0}


async def _load(url: str, bodies: list[dict], concurrency: int, headers: dict, timeout_s: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    tokens = 0
    it = iter(enumerate(bodies))

    async def worker(session):
        nonlocal tokens
        for _, body in it:
            route = "chat/completions" if "messages" in body else "completions"
            t0 = time.perf_counter()
            try:
                async with session.post(f"{url}/{route}", json=body, headers=headers) as r:
                    data = await r.json(content_type=None)
                    if r.status != 200:
                        errors.append(f"{r.status}: {str(data)[:200]}")
                        continue
                    tokens += data["usage"]["completion_tokens"]
            except Exception as e:  # noqa: BLE001 - counted, reported
                errors.append(repr(e)[:200])
                continue
            latencies.append(time.perf_counter() - t0)

    conn = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(session) for _ in range(concurrency))), timeout_s)
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "errors": errors, "wall_s": wall, "completion_tokens": tokens}


def load(url: str, bodies: list[dict], concurrency: int, api_key: str | None = None,
         timeout_s: float = 600) -> dict:
    """Send ``bodies`` to ``url`` (…/v1) from ``concurrency`` connections; returns latencies
    (s), errors, wall time and completion tokens. Raises ``TimeoutError`` past ``timeout_s``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return asyncio.run(_load(url, bodies, concurrency, headers, timeout_s))


def summarize(res: dict) -> dict:
    import numpy as np

    lat = np.array(res["latencies"]) * 1000 if res["latencies"] else np.array([float("nan")])
    n = len(res["latencies"])
    return {"requests": n, "errors": len(res["errors"]), "requests_per_s": round(n / res["wall_s"], 2),
            "tokens_per_s": round(res["completion_tokens"] / res["wall_s"], 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1)}


def prompt_mix(n: int, max_tokens: int, seed: int = 0) -> list[dict]:
    """Completions and chats over held-out task prompts, greedy: the same list at every
    concurrency, so both levels do the same work."""
    from raystages.task.splits import pretrain_texts

    lines = [ln for t in pretrain_texts("val", 60, seed) for ln in t.split("\n") if " = " in ln]
    out = []
    for i in range(n):
        q = lines[i % len(lines)].split(" = ")[0]
        if i % 4 == 3:
            out.append({"model": "bench", "messages": [{"role": "user", "content": q}],
                        "max_tokens": max_tokens, "temperature": 0})
        else:
            out.append({"model": "bench", "prompt": q + " =", "max_tokens": max_tokens, "temperature": 0})
    return out


def _random_checkpoint(out_dir: str, preset: str) -> str:
    from raystages.models import build_causal_lm, export_hf, load_tokenizer, train_tokenizer
    from raystages.spec import ModelSpec
    from raystages.task.splits import pretrain_texts

    tok_dir = f"{out_dir}/tokenizer"
    train_tokenizer(pretrain_texts("train", 300), 512, tok_dir)
    tok = load_tokenizer(tok_dir)
    export_hf(build_causal_lm(ModelSpec(preset=preset), tok, seed=0), tok, f"{out_dir}/model")
    return f"{out_dir}/model"


def run(overrides: list[str]) -> dict:
    from ray import serve

    from raystages.serve.app import deploy, resolve_engine
    from raystages.serve.spec import ServeSpec
    from raystages.spec import parse_options
    from raystages.train.runner import connect_ray

    cfg = parse_options(overrides, DEFAULTS, "bench serve")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        ckpt = cfg["checkpoint"] or _random_checkpoint(tmp, cfg["preset"])
        spec = ServeSpec(engine=cfg["engine"], port=cfg["port"], app_name="bench",
                         defaults={"cpus": cfg["cpus"], "max_num_seqs": max(64, cfg["concurrency"]),
                                   "batch_wait_ms": cfg["batch_wait_ms"]})
        connect_ray()
        t0 = time.perf_counter()
        url, _ = deploy(spec, [f"bench={ckpt}"])
        start_s = time.perf_counter() - t0
        try:
            load(url, prompt_mix(8, cfg["max_tokens"]), 4)  # warm-up: first-request costs
            one = summarize(load(url, prompt_mix(cfg["requests_1"], cfg["max_tokens"]), 1))
            many = summarize(load(url, prompt_mix(cfg["requests"], cfg["max_tokens"]), cfg["concurrency"]))
        finally:
            serve.delete("bench")
    ratio = many["requests_per_s"] / one["requests_per_s"]
    return {"engine": resolve_engine(cfg["engine"]), "checkpoint": cfg["checkpoint"] or f"random {cfg['preset']}",
            "max_tokens": cfg["max_tokens"], "startup_s": round(start_s, 1), "concurrency_1": one,
            f"concurrency_{cfg['concurrency']}": many, "throughput_ratio": round(ratio, 2),
            "target_ratio": 5, "meets_target": ratio >= 5}
