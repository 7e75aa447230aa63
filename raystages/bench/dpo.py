"""``raystages bench dpo``: seconds per DPO optimizer step, ours against TRL's ``DPOTrainer``.

    raystages bench dpo [preset=tiny steps=60 batch=32 micro_batch_size=16 seq_len=64
                         num_workers=2 beta=0.1 trl=true trl_threads=2]

Both train the same fresh ``preset`` checkpoint (the built-in tokenizer) on the same built-in
preference pairs, written once as ``{"prompt", "chosen", "rejected"}`` rows and rendered with
the checkpoint's chat template by each side: sigmoid DPO at ``beta`` with a frozen reference
that scores every batch (no precomputation on either side), ``batch`` pairs per optimizer
step, ``seq_len`` tokens at most per side, fp32 on CPU, lr 1e-4 constant. Ours: Ray Train
with ``num_workers`` ranks of one CPU each and DeepSpeed ZeRO-2 (the spec's default). TRL
(trl==1.13.0, installed by this bench in its own virtualenv as ``bench rl`` installs its
own; skipped with a message when it cannot be installed): one process with ``trl_threads``
torch threads, the same machine's cores, ``micro_batch_size`` pairs per forward and
gradient accumulation up to ``batch``. Figures are steady-state seconds per step, after the
first ``WARMUP_STEPS``. Target from the issue: ``dpo_over_trl <= 1.0``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from raystages.bench.rl import run_in_trl_venv
from raystages.bench.sft import WARMUP_STEPS, fresh_checkpoint, steady_throughput
from raystages.spec import parse_options

DEFAULTS = {"preset": "tiny", "steps": 60, "batch": 32, "micro_batch_size": 16, "seq_len": 64, "num_workers": 2,
            "beta": 0.1, "trl": True, "trl_threads": 2, "trl_venv": "~/.cache/raystages/trl-1.13.0"}
TRL_PIN = "trl==1.13.0"


def dpo_spec(policy: str, pairs: Path, work: Path, o: dict):
    """The DPO spec the bench times."""
    from raystages.spec import parse_spec

    return parse_spec({
        "stage": "dpo", "model": {"path": policy},
        "data": {"source": str(pairs)},
        "dpo": {"loss": "sigmoid", "beta": o["beta"], "eval_prompts": 0},
        "optim": {"lr": 1e-4, "schedule": "constant", "warmup_steps": 0, "max_steps": o["steps"],
                  "micro_batch_size": o["micro_batch_size"],
                  "grad_accum": o["batch"] // (o["micro_batch_size"] * o["num_workers"]), "seq_len": o["seq_len"]},
        "scaling": {"num_workers": o["num_workers"], "cpus_per_worker": 1},
        "logging": {"tensorboard": False, "log_every": 5},
        "run": {"name": "bench-dpo", "storage_path": str(work), "checkpoint_every": 10**6, "eval_every": 10**6}})


def ours(policy: str, pairs: Path, work: Path, o: dict) -> dict:
    from raystages.stages import dpo

    result = dpo.run(dpo_spec(policy, pairs, work, o))
    return {"dpo_step_s": o["batch"] / steady_throughput(result.run_dir)}


def trl(policy: str, pairs: Path, work: Path, o: dict) -> dict:
    out = run_in_trl_venv("dpo", o, TRL_PIN, "trl.trainer.dpo_trainer", "raystages.bench.trl_dpo_baseline", [
        policy, str(pairs), str(o["batch"]), str(o["micro_batch_size"]), str(o["seq_len"]), str(o["beta"]),
        str(o["steps"]), str(work / "trl.json")])
    if "trl_skipped" in out:
        return out
    return {"trl_dpo_step_s": statistics.fmean(out["step_s"][WARMUP_STEPS:]), "trl_threads": o["trl_threads"],
            "trl_version": out["trl_version"]}


def run(overrides: list[str] | None = None) -> dict:
    from raystages.task.splits import preference_rows

    o = parse_options(list(overrides or []), DEFAULTS, "bench dpo")
    if o["batch"] % (o["micro_batch_size"] * o["num_workers"]):
        raise SystemExit(f"bench dpo: batch={o['batch']} must be a multiple of micro_batch_size x num_workers")
    if o["steps"] <= WARMUP_STEPS + 5:
        raise SystemExit(f"bench dpo: steps={o['steps']} leaves no steady steps after the first {WARMUP_STEPS}")
    with tempfile.TemporaryDirectory(prefix="raystages-bench-dpo-") as tmp:
        work = Path(tmp)
        policy = fresh_checkpoint(o["preset"], work)
        pairs = work / "pairs.jsonl"
        rows = preference_rows("train", o["batch"] * o["steps"], min_len=3, max_len=4)
        pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
        result = {"options": o} | ours(policy, pairs, work, o)
        if o["trl"]:
            result |= trl(policy, pairs, work, o)
    if "trl_dpo_step_s" in result:
        result["dpo_over_trl"] = result["dpo_step_s"] / result["trl_dpo_step_s"]
        result["targets"] = {"dpo_over_trl <= 1.0": result["dpo_over_trl"] <= 1.0}
    return result
