"""Ray Tune for real: a grid of pretraining trials run as Ray Train V2 driver functions on
fractional CPUs; a crashing trial is recorded and the others finish; the best config comes
back as a spec that runs, with its checkpoint."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from raystages.spec import SpecError, load_spec
from raystages.tune import load_tune, run_tune
from tests.conftest import CLI, ROOT

TUNE_NANO = {
    "stage": "pretrain", "model": {"preset": "nano"},
    "data": {"builtin": {"num_train": 400, "num_val": 40}},
    "optim": {"max_steps": 20, "seq_len": 64, "micro_batch_size": 8, "warmup_steps": 0, "schedule": "constant"},
    "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
    "run": {"name": "tune-nano", "checkpoint_every": 10, "eval_every": 10, "samples": 0},
    "logging": {"tensorboard": False, "log_every": 10},
    "tune": {"metric": "val_loss", "mode": "min", "max_concurrent": 2, "search_space": {
        "optim.lr": {"grid": [1.0e-2, 1.0e-5]},
        # The second source has a bad row: those trials crash reading it (set by the test).
        "data.source": {"grid": ["builtin", None]}}},
}


def _with_bad_source(raw: dict, tmp_path) -> dict:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "sort: b a = a b"}\n{"nope": 1}\n')
    space = {**raw["tune"]["search_space"], "data.source": {"grid": ["builtin", str(bad)]}}
    return {**raw, "tune": {**raw["tune"], "search_space": space}}


def _write(tmp_path, raw) -> str:
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_tune_block_errors_name_the_key(tmp_path):
    raw = _with_bad_source(TUNE_NANO, tmp_path)
    bad_key = {**raw, "tune": {**TUNE_NANO["tune"], "search_space": {"optim.lrr": {"grid": [1e-3]}}}}
    with pytest.raises(SpecError, match=r"tune.search_space.optim.lrr=0.001 gives an invalid spec:\n  optim.lrr"):
        load_tune(_write(tmp_path, bad_key))
    bad_value = {**raw, "tune": {**raw["tune"], "search_space": {"optim.lr": {"grid": [1e-3, -1]}}}}
    with pytest.raises(SpecError, match=r"optim.lr=-1 gives an invalid spec:\n  optim.lr: Input should be greater than 0"):
        load_tune(_write(tmp_path, bad_value))
    bad_kind = {**raw, "tune": {**raw["tune"], "search_space": {"optim.lr": {"uniform": [1e-2, 1e-3]}}}}
    with pytest.raises(SpecError, match="low < high"):
        load_tune(_write(tmp_path, bad_kind))
    out = subprocess.run([*CLI, "tune", _write(tmp_path, bad_key)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "optim.lrr" in out.stderr and "Traceback" not in out.stderr
    spec, tune = load_tune(ROOT / "jobs/tune-pretrain.yaml")
    assert spec.stage == "pretrain" and len(tune.param_space()) == 2


@pytest.mark.slow
def test_grid_trials_run_crash_is_isolated_and_best_spec_runs(ray_session, runs_dir, tmp_path):
    raw = _with_bad_source({**TUNE_NANO, "run": {**TUNE_NANO["run"], "storage_path": str(runs_dir)}}, tmp_path)
    bad = raw["tune"]["search_space"]["data.source"]["grid"][1]
    spec, tune = load_tune(_write(tmp_path, raw))
    result = run_tune(spec, tune)
    rows = {(r["optim.lr"], r["data.source"]): r for r in result.rows}
    assert len(rows) == 4
    for lr in (1e-2, 1e-5):
        crashed = rows[(lr, bad)]
        assert crashed["status"] == "ERROR" and "line 2: missing text field" in crashed["error"], crashed
        assert rows[(lr, "builtin")]["status"] == "OK" and rows[(lr, "builtin")]["step"] == 20
        # Checkpoint reports at steps 10 and 20 and the export reached Tune through
        # TuneReportCallback, then the driver's final row.
        assert rows[(lr, "builtin")]["reports"] >= 3
    good, slow = rows[(1e-2, "builtin")]["val_loss"], rows[(1e-5, "builtin")]["val_loss"]
    assert good < slow - 1.0, (good, slow)
    assert result.best_config == {"optim.lr": 1e-2, "data.source": "builtin"}
    assert result.best_metric == good
    best = load_spec(result.best_spec)
    assert best.optim.lr == 1e-2 and best.run.name == "tune-nano-best" and best.stage == "pretrain"
    assert (result.best_checkpoint / "config.json").is_file()
    lineage = json.loads((result.best_checkpoint / "lineage.json").read_text())
    assert lineage["spec"]["optim"]["lr"] == 1e-2
    assert "ERROR" in (spec.run_dir() / "tune_results.md").read_text()


@pytest.mark.slow
def test_rl_trials_report_each_iteration_and_stop_on_a_kl_bound(ray_session, runs_dir, random_checkpoint, tmp_path):
    """RL has no TorchTrainer: its trials report metrics.jsonl rows, one per iteration, and a
    `stop` bound ends the trial at the first report whose KL to the reference passes it."""
    raw = {"stage": "rl", "model": {"path": str(random_checkpoint)},
           "data": {"builtin": {"num_train": 200, "num_val": 8}},
           "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0, "micro_batch_size": 8},
           "algo": {"name": "grpo", "iterations": 6, "prompts_per_iteration": 8, "group_size": 2,
                    "mini_batch_size": 16},
           "rollout": {"engine": "hf", "eval_prompts": 0, "eval_samples": 0, "cpus_per_actor": 0.5,
                       "max_new_tokens": 8},
           "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
           "run": {"name": "tune-rl", "storage_path": str(runs_dir), "checkpoint_every": 100},
           "logging": {"tensorboard": False},
           "tune": {"metric": "reward", "mode": "max", "max_concurrent": 1,
                    "stop": {"kl_ref": 1e-9},  # KL is 0 until the policy first moves
                    "search_space": {"optim.lr": {"grid": [1e-3]}}}}
    spec, tune = load_tune(_write(tmp_path, raw))
    result = run_tune(spec, tune)
    (row,) = result.rows
    trial_dir = spec.run_dir() / "trials" / row["trial"]
    logged = [json.loads(line) for line in (trial_dir / "metrics.jsonl").read_text().splitlines()]
    # One Tune report per iteration, until the first one whose KL passed the bound.
    first_over = next(r["step"] for r in logged if r["kl_ref"] > 1e-9)
    assert row["status"] == "OK" and row["step"] == row["reports"] == first_over < 6, (row, logged)


@pytest.mark.slow
def test_dpo_trials_with_and_without_a_reference_report_and_the_best_spec_parses(ray_session, runs_dir,
                                                                                  random_checkpoint, tmp_path):
    """DPO through Tune: a grid over the loss, sigmoid (the frozen reference model on the
    engine) and ORPO (no reference), each trial a Ray Train run that reports its held-out
    reward accuracy; the best comes back as a dpo spec."""
    raw = {"stage": "dpo", "model": {"path": str(random_checkpoint)},
           "data": {"builtin": {"num_train": 320, "num_val": 64, "min_len": 3, "max_len": 4}},
           "dpo": {"rpo_alpha": 0, "eval_prompts": 0},
           "optim": {"max_steps": 10, "micro_batch_size": 8, "warmup_steps": 0, "schedule": "constant"},
           "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
           "run": {"name": "tune-dpo", "storage_path": str(runs_dir), "checkpoint_every": 5, "eval_every": 5,
                   "eval_batches": 2},
           "logging": {"tensorboard": False, "log_every": 5},
           "tune": {"metric": "val_reward_accuracy", "mode": "max", "max_concurrent": 2,
                    "search_space": {"dpo.loss": {"grid": ["sigmoid", "orpo"]}}}}
    spec, tune = load_tune(_write(tmp_path, raw))
    result = run_tune(spec, tune)
    rows = {r["dpo.loss"]: r for r in result.rows}
    assert set(rows) == {"sigmoid", "orpo"}
    for row in rows.values():
        assert row["status"] == "OK" and row["step"] == 10 and row["reports"] >= 2, row
        assert 0 <= row["val_reward_accuracy"] <= 1
    top = max(r["val_reward_accuracy"] for r in rows.values())
    best = result.best_config["dpo.loss"]  # either, on a tie
    assert set(result.best_config) == {"dpo.loss"} and rows[best]["val_reward_accuracy"] == result.best_metric == top
    best_spec = load_spec(result.best_spec)
    assert best_spec.stage == "dpo" and best_spec.dpo.loss == best and best_spec.run.name == "tune-dpo-best"
    assert json.loads((result.best_checkpoint / "lineage.json").read_text())["stage"] == "dpo"
