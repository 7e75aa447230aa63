"""Corpus size vs memory and start-up: the real ``raystages pretrain`` command on growing
corpora, its memory sampled from outside.

For each size a folder of plain-text files (≤64 MB each, documents resampled from the
built-in generator) is written to a temporary folder, then ``python -m raystages pretrain``
runs on it as a subprocess (its own local Ray, tiny preset, 2 workers, ``max_steps``
steps) while the RSS of the command's process and of its whole process tree (Ray's GCS,
raylet and workers included) is sampled every 0.5 s. The largest size then runs again
with the token cache warm.

    raystages bench data [sizes=0.1,1,4 max_steps=30 workers=2]

Ends with one JSON object: per size ``driver_peak_rss_mb``, ``tree_peak_rss_mb``,
``seconds_to_first_step`` (from the run's ``startup.json``: command start to the first
optimizer step), ``steady_tokens_per_s``; the largest-over-smallest ratios; the warm run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FILE_BYTES = 64 << 20
SAMPLE_S = 0.5
WARMUP_STEPS = 10


def write_corpus(folder: Path, size_bytes: int, seed: int = 0) -> int:
    """``size_bytes`` of paragraphs (documents resampled from the built-in corpus) in
    ``corpus-NNNN.txt`` files of at most ``FILE_BYTES``; the bytes written."""
    from raystages.task.splits import pretrain_texts

    docs = [d.encode() + b"\n\n" for d in pretrain_texts("train", 2000, seed)]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written, index = 0, 0
    while written < size_bytes:
        target = min(FILE_BYTES, size_bytes - written)
        chunk, n = [], 0
        while n < target:
            doc = docs[rng.randrange(len(docs))]
            chunk.append(doc)
            n += len(doc)
        (folder / f"corpus-{index:04d}.txt").write_bytes(b"".join(chunk))
        written, index = written + n, index + 1
    return written


def _tree_rss(proc) -> tuple[int, int]:
    """(RSS of ``proc``, summed RSS of it and all its descendants), bytes."""
    import psutil

    try:
        own = proc.memory_info().rss
        kids = proc.children(recursive=True)
    except psutil.Error:
        return 0, 0
    total = own
    for k in kids:
        try:
            total += k.memory_info().rss
        except psutil.Error:
            pass
    return own, total


def run_pretrain(corpus: Path, storage: Path, name: str, opts: dict) -> dict:
    """One ``raystages pretrain`` subprocess on ``corpus``: its figures."""
    import psutil

    overrides = [f"data.source={corpus}", f"run.storage_path={storage}", f"run.name={name}",
                 "model.preset=tiny", f"optim.max_steps={opts['max_steps']}",
                 f"scaling.num_workers={opts['workers']}", "run.samples=0", "logging.log_every=5",
                 "run.eval_every=100000", "run.checkpoint_every=100000", "logging.tensorboard=false"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, as a user's
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "raystages", "pretrain", *overrides],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    driver_peak = tree_peak = 0
    while proc.poll() is None:
        own, total = _tree_rss(ps)
        driver_peak, tree_peak = max(driver_peak, own), max(tree_peak, total)
        time.sleep(SAMPLE_S)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"raystages pretrain on {corpus} exited {proc.returncode}: {err[-2000:]}")
    run_dir = storage / name
    startup = json.loads((run_dir / "startup.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    logged = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [m["throughput"] for m in logged if m["step"] > WARMUP_STEPS and "throughput" in m]
    return {
        "driver_peak_rss_mb": round(driver_peak / 2**20),
        "tree_peak_rss_mb": round(tree_peak / 2**20),
        "seconds_to_first_step": startup["seconds_to_first_step"],
        "steady_tokens_per_s": round(len(steady) / sum(1 / t for t in steady)) if steady else None,
        "startup_phases_s": startup["phases"],
        "token_cache": summary["metrics"].get("token_cache"),
        "token_cache_blocks": summary["metrics"].get("token_cache_blocks"),
        "wall_s": round(time.time() - t0, 1),
    }


def run(overrides: list[str]) -> dict:
    from raystages.spec import parse_options

    opts = parse_options(overrides, {"sizes": "0.1,1,4", "max_steps": 30, "workers": 2, "keep": False},
                         "bench data")
    sizes = [float(s) for s in str(opts["sizes"]).split(",")]
    root = Path(tempfile.mkdtemp(prefix="raystages-bench-data-"))
    runs: dict[str, dict] = {}
    try:
        for size in sizes:
            corpus = root / f"corpus-{size:g}gb"
            written = write_corpus(corpus, int(size * 1e9))
            runs[f"{size:g}"] = {"corpus_mb": round(written / 1e6, 1),
                                 **run_pretrain(corpus, root / "runs", f"size-{size:g}", opts)}
        largest, smallest = f"{max(sizes):g}", f"{min(sizes):g}"
        warm = run_pretrain(root / f"corpus-{largest}gb", root / "runs", f"warm-{largest}", opts)
    finally:
        if not opts["keep"]:
            shutil.rmtree(root, ignore_errors=True)
    lo, hi = runs[smallest], runs[largest]
    return {
        "sizes_gb": sizes, "max_steps": opts["max_steps"], "workers": opts["workers"], "runs": runs,
        "driver_rss_ratio_largest_over_smallest": round(hi["driver_peak_rss_mb"] / lo["driver_peak_rss_mb"], 3),
        "first_step_ratio_largest_over_smallest": round(hi["seconds_to_first_step"] / lo["seconds_to_first_step"], 3),
        "warm_cache_largest": warm,
        "warm_first_step_ratio_largest_over_smallest_cold": round(
            warm["seconds_to_first_step"] / lo["seconds_to_first_step"], 3),
        "targets": {"ratios_at_most": 1.25, "warm_seconds_to_first_step_at_most": 20},
    }
