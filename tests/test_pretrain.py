"""Pretraining for real: Ray Train workers, DeepSpeed ZeRO-2/3, checkpoints, faults, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from raystages.spec import load_spec
from raystages.stages import pretrain
from tests.conftest import ROOT
from tests.run_helpers import logged_metrics, run_killing_a_worker, wait_for_registered_checkpoint

pytestmark = pytest.mark.slow


def _nano_spec(runs_dir, name, *extra):
    return load_spec(ROOT / "jobs" / "pretrain.yaml", [
        f"run.storage_path={runs_dir}", f"run.name={name}", "model.preset=nano", "run.samples=0",
        "optim.seq_len=64", "optim.micro_batch_size=8", "data.builtin.num_train=400",
        "data.builtin.num_val=40", "logging.log_every=5", "run.eval_every=1000", *extra])


def test_zero2_pretraining_lowers_held_out_loss_and_exports(pretrained_checkpoint):
    from transformers import AutoModelForCausalLM

    run_dir = pretrained_checkpoint.parent
    logged = logged_metrics(run_dir)
    first_loss = logged[0]["loss"]
    lineage = json.loads((pretrained_checkpoint / "lineage.json").read_text())
    final = lineage["metrics"]
    # A random model over a ~300-token vocabulary starts near ln(300) = 5.7 nats.
    assert first_loss > 4.0
    assert final["val_loss"] < first_loss - 2.0, (first_loss, final)
    assert final["step"] == 500 and lineage["stage"] == "pretrain" and lineage["parent"] is None
    assert lineage["spec"]["deepspeed"]["zero_stage"] == 2 and len(lineage["spec_hash"]) == 16
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    model = AutoModelForCausalLM.from_pretrained(pretrained_checkpoint, use_safetensors=True)
    assert model.config.num_hidden_layers == 4


def test_zero3_export_equals_the_sharded_training_state(ray_session, runs_dir):
    """The HF export gathered from ZeRO-3 shards has exactly the trained weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    spec = _nano_spec(runs_dir, "zero3", "deepspeed.zero_stage=3", "optim.max_steps=30",
                      "run.checkpoint_every=30", "optim.lr=1e-2")
    result = pretrain.run(spec)
    logged = logged_metrics(result.run_dir)
    assert result.metrics["val_loss"] < logged[0]["loss"] - 0.5
    ckpts = sorted(p for p in result.run_dir.glob("checkpoint_*") if (p / "state").is_dir())
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpts[-1]), tag="state")
    exported = AutoModelForCausalLM.from_pretrained(result.export_dir, use_safetensors=True).eval()
    trained = AutoModelForCausalLM.from_config(exported.config).eval()
    trained.load_state_dict(state, strict=False)
    trained.tie_weights()
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, trained(ids).logits)


def test_killed_worker_restarts_from_last_checkpoint(ray_session, runs_dir):
    spec = _nano_spec(runs_dir, "worker-kill", "optim.max_steps=300", "run.checkpoint_every=40",
                      "run.max_failures=2")
    result = run_killing_a_worker(pretrain.run, spec, 40)
    assert result.metrics["step"] == 300
    steps = [m["step"] for m in logged_metrics(spec.run_dir())]
    # After the restart the group continued from the checkpoint, so some steps ran twice,
    # and it did not start over from step 0 (step 5 is logged once).
    assert len(steps) > len(set(steps)) and steps.count(5) == 1
    assert 40 <= result.metrics["start_step"] < 300, result.metrics


def test_killed_driver_rerun_resumes_and_ignores_orphan_checkpoints(ray_session, runs_dir):
    spec = _nano_spec(runs_dir, "driver-kill", "optim.max_steps=300", "run.checkpoint_every=40")
    overrides = [f"run.storage_path={runs_dir}", "run.name=driver-kill", "model.preset=nano",
                 "run.samples=0", "optim.seq_len=64", "optim.micro_batch_size=8",
                 "data.builtin.num_train=400", "data.builtin.num_val=40", "logging.log_every=5",
                 "run.eval_every=1000", "optim.max_steps=300", "run.checkpoint_every=40"]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "raystages.cli", "pretrain",
                               str(ROOT / "jobs" / "pretrain.yaml"), *overrides],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_registered_checkpoint(spec.run_dir())
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    # A checkpoint folder that a crash left half-written: Ray never registered it.
    orphan = spec.run_dir() / "checkpoint_2099-01-01_00-00-00.000000"
    (orphan / "state").mkdir(parents=True)
    (orphan / "state" / "garbage").write_text("half written")
    time.sleep(5)  # let Ray reap the dead driver's controller and workers
    result = pretrain.run(spec)
    assert result.metrics["step"] == 300
    assert 40 <= result.metrics["start_step"] < 300, result.metrics
    # The killed run (or an earlier one on the same data) filled the token cache: the rerun
    # read its blocks instead of tokenising again.
    summary = json.loads((spec.run_dir() / "summary.json").read_text())
    assert summary["metrics"]["token_cache"] == "hit" and summary["metrics"]["token_cache_blocks"] > 0


def test_pretraining_on_real_text_with_the_gpt2_tokenizer(ray_session, runs_dir):
    """tinyshakespeare through the file path, GPT-2's real BPE, ZeRO-1: the loss falls."""
    from tests.conftest import shared_data

    spec = load_spec(ROOT / "jobs" / "pretrain.yaml", [
        f"run.storage_path={runs_dir}", "run.name=shakespeare", "model.preset=nano",
        f"data.source={shared_data('tinyshakespeare', 'input.txt')}", "data.max_rows=600",
        f"tokenizer.path={shared_data('gpt2_bpe')}", "deepspeed.zero_stage=1",
        "optim.max_steps=25", "optim.warmup_steps=5", "optim.seq_len=64", "optim.micro_batch_size=8", "optim.lr=1e-2",
        "run.eval_every=25", "run.checkpoint_every=1000", "logging.log_every=5", "run.samples=1"])
    result = pretrain.run(spec)
    first = logged_metrics(result.run_dir)[0]["loss"]
    assert first > 9.0  # ~ln(50257) = 10.8 for a fresh model
    assert result.metrics["val_loss"] < first - 3.0
    assert len(result.metrics["samples"]) == 1
    lineage = json.loads((result.export_dir / "lineage.json").read_text())
    assert lineage["spec"]["data"]["source"].endswith("input.txt")
