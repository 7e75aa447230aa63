"""``raystages bench rl``: the RL stage's three figures on one model, batch and length.

    raystages bench rl [preset=tiny batch=64 max_new_tokens=32 iterations=5 ppo_epochs=2 trl=true]
                       [off_policy=false: true times our one-step-off-policy mode instead]
                       [zero_stage=2: the learners' ZeRO stage (the spec's default)]

(a) rollout tokens/s, vLLM engine vs the transformers engine (same actor pool, same prompts);
(b) weight-sync bytes/s (learner -> rollout actor through the object store, measured inside
    a PPO run) vs a plain in-process memory copy of the same bytes;
(c) PPO iteration wall time (generate + score + update + sync) vs TRL's PPOTrainer
    (trl==1.12.0, installed by this bench in its own virtualenv; skipped with a message
    when it cannot be installed) on the same model, reward model, batch and lengths.
Targets from the issue: vLLM >= 3x HF; sync >= 0.5x memcpy; PPO iteration <= 0.5x TRL's.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from raystages.spec import DeepSpeedSpec, parse_options

DEFAULTS = {"preset": "tiny", "batch": 64, "max_new_tokens": 32, "iterations": 5, "ppo_epochs": 2,
            "micro_batch_size": 16, "num_workers": 2, "off_policy": False,
            "zero_stage": DeepSpeedSpec.model_fields["zero_stage"].default,
            "trl": True, "trl_threads": 1, "trl_venv": "~/.cache/raystages/trl-1.12.0"}
TRL_PIN = "trl==1.12.0"


def _options(overrides: list[str]) -> dict:
    return parse_options(overrides, DEFAULTS, "bench rl")


def _models(work: Path, preset: str, config_overrides: dict | None = None) -> tuple[Path, Path]:
    """A fresh policy of ``preset`` (with ``config_overrides``) and the built-in tokenizer,
    and a reward model sharing its backbone (a sequence-classification head on the same weights)."""
    from transformers import AutoModelForSequenceClassification

    from raystages.models import build_causal_lm, export_hf, train_tokenizer
    from raystages.spec import ModelSpec
    from raystages.task.splits import pretrain_texts

    tok = train_tokenizer(pretrain_texts("train", 300), 512, work / "tokenizer")
    policy = work / "policy"
    model_spec = ModelSpec(preset=preset, config_overrides=config_overrides or {})
    export_hf(build_causal_lm(model_spec, tok, seed=0), tok, policy)
    rm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    export_hf(rm, tok, work / "rm")
    return policy, work / "rm"


def bench_engines(policy: Path, batch: int, max_new_tokens: int) -> dict:
    from raystages.models import load_tokenizer
    from raystages.rl.actor import RolloutPool
    from raystages.rl.loop import encode
    from raystages.task.splits import rl_prompts

    tok = load_tokenizer(str(policy))
    ids = encode(tok, [r["prompt"] for r in rl_prompts("train", batch)])
    out = {}
    for kind in ("vllm", "hf"):
        pool = RolloutPool(kind, str(policy), 1, {"kv_cache_mb": 64, "seed": 0} if kind == "vllm" else {"seed": 0},
                           cpus=0.5)
        try:
            pool.generate(ids, list(range(batch)), 1.0, max_new_tokens)  # warm-up
            rates = []
            for rep in range(3):
                t0 = time.perf_counter()
                gens = pool.generate(ids, [rep * batch + j for j in range(batch)], 1.0, max_new_tokens)
                rates.append(sum(len(g.response_ids) for g in gens) / (time.perf_counter() - t0))
            out[f"{kind}_tokens_per_s"] = statistics.median(rates)
        finally:
            pool.shutdown()
    out["vllm_over_hf"] = out["vllm_tokens_per_s"] / out["hf_tokens_per_s"]
    return out


def ppo_spec(policy: Path, rm: Path, work: Path, o: dict, rollout: dict | None = None, name: str = "bench-rl-ppo"):
    """The RL spec the bench times: PPO with a critic from the reward model, one mini-batch
    per epoch (as TRL's ``num_mini_batches=1``), the bench's batch, lengths and workers
    (``rollout``: more rollout settings; ``name``: the run's name)."""
    from raystages.spec import parse_spec

    return parse_spec({
        "stage": "rl", "model": {"path": str(policy)},
        "optim": {"lr": 1e-4, "micro_batch_size": o["micro_batch_size"]},
        "algo": {"name": "ppo", "iterations": o["iterations"], "prompts_per_iteration": o["batch"], "group_size": 1,
                 "mini_batch_size": o["batch"], "ppo_epochs": o["ppo_epochs"],
                 "one_step_off_policy": o["off_policy"]},
        "rollout": {"max_new_tokens": o["max_new_tokens"], "eval_prompts": 0, "cpus_per_actor": 0.5} | (rollout or {}),
        "reward": {"sources": [{"kind": "model", "ref": str(rm)}]}, "critic": {"init": "reward_model"},
        # Fractional CPUs: learners and the rollout actor must all fit on a 2-core machine.
        "scaling": {"num_workers": o["num_workers"], "cpus_per_worker": 0.5}, "logging": {"tensorboard": False},
        "deepspeed": {"zero_stage": o["zero_stage"]},
        "run": {"name": name, "storage_path": str(work), "checkpoint_every": 10**6}})


def bench_ppo(policy: Path, rm: Path, work: Path, o: dict) -> dict:
    from raystages.rl.sync import memcpy_bytes_per_s
    from raystages.stages import rl

    result = rl.run(ppo_spec(policy, rm, work, o))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows  # the first iteration pays one-off warm-up costs
    sync = statistics.median(r["sync_bytes_per_s"] for r in steady)
    memcpy = memcpy_bytes_per_s(int(rows[0]["sync_bytes"]))
    # The iteration and where it goes (medians): generation waits on the actors while the
    # learner ranks idle; compute and update run on every rank; sync is learner -> actor.
    times = {f"ppo_{k}": statistics.median(r[k] for r in steady)
             for k in ("iteration_s", "gen_s", "compute_s", "update_s", "sync_s")}
    return times | {"sync_bytes": rows[0]["sync_bytes"], "sync_bytes_per_s": sync, "memcpy_bytes_per_s": memcpy,
                    "sync_over_memcpy": sync / memcpy}


def trl_python(venv: Path, pin: str, module: str) -> tuple[Path | None, str]:
    """The python of a virtualenv holding TRL at ``pin`` (created on first use) that can
    import ``module``, or None and why not."""
    import site

    py = venv / "bin" / "python"
    if py.is_file() and subprocess.run([str(py), "-c", f"import {module}"], capture_output=True).returncode == 0:
        return py, ""
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        # See this stack's site-packages (torch, transformers, raystages) behind the venv's
        # own, so pip adds only TRL and what it lacks instead of a second (CUDA) torch.
        lib = next((venv / "lib").glob("python*/site-packages"))
        (lib / "_raystages_stack.pth").write_text(
            "".join(f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages()))
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", pin], capture_output=True, text=True, timeout=900)
        if r.returncode:
            return None, f"pip install {pin} failed: {r.stderr.strip()[-300:]}"
        if subprocess.run([str(py), "-c", f"import {module}"], capture_output=True).returncode:
            return None, f"{pin} has no {module}"
        return py, ""
    except (OSError, StopIteration, subprocess.SubprocessError) as e:
        return None, f"could not create the TRL virtualenv: {e}"


def run_in_trl_venv(bench: str, o: dict, pin: str, needs: str, module: str, args: list[str]) -> dict:
    """``python -m module *args`` in the TRL virtualenv ``o["trl_venv"]`` (created on first
    use, with ``pin``, able to import ``needs``) and ``o["trl_threads"]`` torch threads; the
    JSON it wrote to its last argument, or ``{"trl_skipped": why}`` (also printed) when TRL
    cannot be installed or the run fails."""
    py, why = trl_python(Path(os.path.expanduser(o["trl_venv"])), pin, needs)
    if py is not None:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(o["trl_threads"])}
        r = subprocess.run([str(py), "-m", module, *args], capture_output=True, text=True, env=env)
        if not r.returncode:
            return json.loads(Path(args[-1]).read_text())
        why = f"{module} failed: {r.stderr.strip()[-500:]}"
    print(f"bench {bench}: skipping the TRL comparison: {why}", file=sys.stderr)
    return {"trl_skipped": why}


def bench_trl(policy: Path, rm: Path, work: Path, o: dict) -> dict:
    # One torch thread by default, like each of our learner ranks: on a shared 2-core machine
    # two OpenMP threads spin-wait on each other and ran 10-40x slower here.
    out = run_in_trl_venv("rl", o, TRL_PIN, "trl.experimental.ppo", "raystages.rl.trl_baseline", [
        str(policy), str(rm), str(o["batch"]), str(o["micro_batch_size"]), str(o["max_new_tokens"]),
        str(o["ppo_epochs"]), str(o["iterations"]), str(work / "trl.json")])
    if "trl_skipped" in out:
        return out
    times = out["iteration_s"]
    return {"trl_ppo_iteration_s": statistics.median(times[1:] or times), "trl_threads": o["trl_threads"]}


def run(overrides: list[str] | None = None) -> dict:
    from raystages.train.runner import connect_ray

    o = _options(list(overrides or []))
    with tempfile.TemporaryDirectory(prefix="raystages-bench-rl-") as tmp:
        work = Path(tmp)
        policy, rm = _models(work, o["preset"])
        connect_ray()
        result = {"options": o} | bench_engines(policy, o["batch"], o["max_new_tokens"])
        result |= bench_ppo(policy, rm, work, o)
        if o["trl"]:
            result |= bench_trl(policy, rm, work, o)
            if "trl_ppo_iteration_s" in result:
                result["ppo_over_trl"] = result["ppo_iteration_s"] / result["trl_ppo_iteration_s"]
    result["targets"] = {"vllm_over_hf >= 3": result["vllm_over_hf"] >= 3,
                         "sync_over_memcpy >= 0.5": result["sync_over_memcpy"] >= 0.5}
    if "ppo_over_trl" in result:
        result["targets"]["ppo_over_trl <= 0.5"] = result["ppo_over_trl"] <= 0.5
    return result
