"""Serving throughput: requests/s and latency at concurrency 1 and 32, same checkpoint and
prompt mix, over real HTTP on loopback; the ratio of the two throughputs shows batching.

    raystages bench serve [checkpoint=runs/pretrain/model engine=vllm max_tokens=32 requests=512]

Without ``checkpoint`` a fresh ``tiny``-preset model with the built-in tokenizer is used
(greedy decoding, so both concurrency levels do the same work). Target: ratio >= 5.

With the vLLM engine (``compare=vllm-serve``, the default there), the same loads then run
against vLLM's own OpenAI server (what ``vllm serve`` starts: API server plus engine-core
process) on the same checkpoint and engine settings, one after the other on the same
cores, and ``ratio_vs_vllm_serve_c32`` is raystages' requests/s over vLLM's at
concurrency 32 (target >= 0.8).
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DEFAULTS = {"checkpoint": None, "engine": "auto", "max_tokens": 32, "requests": 512, "requests_1": 48,
            "concurrency": 32, "port": 8123, "cpus": 1.0, "preset": "tiny", "batch_wait_ms": 20.0,
            "compare": "auto", "vllm_serve_port": 8124}


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
    """Completions and chats over held-out task prompts, greedy, each generating exactly
    ``max_tokens`` (``ignore_eos``): the same list at every concurrency and on both servers,
    so every load does the same work whatever the checkpoint."""
    from raystages.task.splits import pretrain_texts

    lines = [ln for t in pretrain_texts("val", 60, seed) for ln in t.split("\n") if " = " in ln]
    out = []
    for i in range(n):
        q = lines[i % len(lines)].split(" = ")[0]
        ask = {"messages": [{"role": "user", "content": q}]} if i % 4 == 3 else {"prompt": q + " ="}
        out.append({"model": "bench", **ask, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
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


def _measure(url: str, cfg: dict) -> tuple[dict, dict]:
    """Warm up, then the concurrency-1 and concurrency-N loads, summarised."""
    load(url, prompt_mix(8, cfg["max_tokens"]), 4)  # warm-up: first-request costs
    one = summarize(load(url, prompt_mix(cfg["requests_1"], cfg["max_tokens"]), 1))
    many = summarize(load(url, prompt_mix(cfg["requests"], cfg["max_tokens"]), cfg["concurrency"]))
    return one, many


def vllm_serve_command(ckpt: str, spec, port: int) -> list[str]:
    """vLLM's OpenAI server on ``ckpt`` with the engine settings raystages gives the model
    (dtype, context, sequences, eager mode, KV-cache bytes), served as ``bench``."""
    from raystages.models import context_length

    m = spec.model_spec("bench", ckpt)
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", ckpt,
            "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port), "--dtype", m.dtype,
            "--max-model-len", str(m.max_model_len or context_length(None, ckpt, None)),
            "--max-num-seqs", str(m.max_num_seqs), "--enforce-eager", "--kv-cache-memory-bytes", str(m.kv_cache_mb << 20),
            "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]


def run_vllm_serve(ckpt: str, spec, cfg: dict, log_path: Path, start_timeout_s: float = 600) -> dict:
    """Start vLLM's own server, wait for ``/health``, run the same loads, stop it."""
    from raystages.serve.app import CPU_ENGINE_ENV

    threads = str(max(1, math.ceil(cfg["cpus"])))  # as many torch threads as raystages' engine gets
    env = {**os.environ, **CPU_ENGINE_ENV, "OMP_NUM_THREADS": threads}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # plain `vllm serve`: its engine-core process
    port = cfg["vllm_serve_port"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(vllm_serve_command(ckpt, spec, port), env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.perf_counter()
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text().splitlines()[-15:]
                raise RuntimeError("vllm serve exited with code %s:\n%s" % (proc.returncode, "\n".join(tail)))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > start_timeout_s:
                raise TimeoutError(f"vllm serve did not answer /health within {start_timeout_s:.0f} s; log: {log_path}")
            time.sleep(1)
        start_s = time.perf_counter() - t0
        one, many = _measure(f"http://127.0.0.1:{port}/v1", cfg)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
    return {"startup_s": round(start_s, 1), "concurrency_1": one, f"concurrency_{cfg['concurrency']}": many}


def run(overrides: list[str]) -> dict:
    from ray import serve

    from raystages.serve.app import deploy, resolve_engine
    from raystages.serve.spec import ServeSpec
    from raystages.spec import SpecError, parse_options
    from raystages.train.runner import connect_ray

    cfg = parse_options(overrides, DEFAULTS, "bench serve")
    engine = resolve_engine(cfg["engine"])
    compare = cfg["compare"] if cfg["compare"] != "auto" else ("vllm-serve" if engine == "vllm" else "none")
    if compare not in ("vllm-serve", "none"):
        raise SpecError(f"bench serve: compare must be auto, vllm-serve or none (got {compare!r})")
    if compare == "vllm-serve" and engine != "vllm":
        raise SpecError("bench serve: compare=vllm-serve needs engine=vllm (the same engine on both sides)")
    c = cfg["concurrency"]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        ckpt = cfg["checkpoint"] or _random_checkpoint(tmp, cfg["preset"])
        spec = ServeSpec(engine=cfg["engine"], port=cfg["port"], app_name="bench",
                         defaults={"cpus": cfg["cpus"], "max_num_seqs": max(64, c),
                                   "batch_wait_ms": cfg["batch_wait_ms"]})
        connect_ray()
        t0 = time.perf_counter()
        url, _ = deploy(spec, [f"bench={ckpt}"])
        start_s = time.perf_counter() - t0
        try:
            one, many = _measure(url, cfg)
        finally:
            serve.delete("bench")
        ratio = many["requests_per_s"] / one["requests_per_s"]
        out = {"engine": engine, "checkpoint": cfg["checkpoint"] or f"random {cfg['preset']}",
               "max_tokens": cfg["max_tokens"], "startup_s": round(start_s, 1), "concurrency_1": one,
               f"concurrency_{c}": many, f"ratio_c{c}_over_c1": round(ratio, 2), "target_ratio": 5,
               "meets_target": ratio >= 5}
        if compare == "vllm-serve":
            # Ray Serve's replicas are gone (serve.delete), so vLLM's server gets the same idle cores.
            theirs = out["vllm_serve"] = run_vllm_serve(ckpt, spec, cfg, Path(tmp) / "vllm-serve.log")
            out[f"ratio_vs_vllm_serve_c{c}"] = round(many["requests_per_s"] / theirs[f"concurrency_{c}"]["requests_per_s"], 2)
    return out
