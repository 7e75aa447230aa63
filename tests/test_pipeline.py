"""The four-stage pipeline for real (nano models, few steps): each export feeds the next,
lineage chains back to pretraining, a rerun skips what is done, and the report shows every model answering the same held-out prompts."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from raystages.pipeline import chain_key, format_chain, lineage_chain, load_pipeline, run_pipeline
from raystages.report import running_mean, write_report
from raystages.spec import SpecError
from tests.conftest import CLI, ROOT

QUICK = ROOT / "jobs" / "quickstart.yaml"
NANO_TRAIN = ["model.preset=nano", "optim.seq_len=64", "optim.micro_batch_size=8",
              "scaling.cpus_per_worker=0.5", "logging.tensorboard=false", "logging.log_every=5"]


def nano_overrides(storage) -> list[str]:
    out = [f"storage_path={storage}", "name=nano", "report.prompts=4", "report.max_new_tokens=8"]
    for stage, extra in {
        "pretrain": ["optim.max_steps=30", "run.eval_every=15", "run.checkpoint_every=30",
                     "data.builtin.num_train=600", "data.builtin.num_val=40", "optim.lr=1e-2"],
        "sft": ["optim.max_steps=20", "run.eval_every=10", "run.checkpoint_every=20",
                "data.builtin.num_train=300", "data.builtin.num_val=20", "sft.eval_prompts=4"],
        "rm": ["optim.max_steps=20", "run.eval_every=10", "run.checkpoint_every=20",
               "data.builtin.num_train=300", "data.builtin.num_val=20"],
    }.items():
        out += [f"stages.{stage}.{o}" for o in (NANO_TRAIN if stage == "pretrain" else NANO_TRAIN[1:]) + extra]
    out += [f"stages.rl.{o}" for o in [
        "algo.iterations=2", "algo.prompts_per_iteration=8", "algo.group_size=2", "algo.mini_batch_size=16",
        "optim.micro_batch_size=8", "rollout.engine=hf", "rollout.eval_prompts=4", "rollout.eval_samples=0",
        "rollout.cpus_per_actor=0.5", "scaling.cpus_per_worker=0.5", "logging.tensorboard=false"]]
    return out


def test_pipeline_spec_errors_name_the_stage_and_field(tmp_path):
    raw = yaml.safe_load(QUICK.read_text())
    bad = {**raw, "stages": {**raw["stages"], "sft": {**raw["stages"]["sft"], "optim": {"lrr": 1}}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(SpecError, match=r"stages.sft: invalid sft spec\n  optim.lrr: Extra inputs"):
        load_pipeline(tmp_path / "p.yaml")
    orphan = {**raw, "stages": {"rm": raw["stages"]["rm"]}}
    (tmp_path / "o.yaml").write_text(yaml.safe_dump(orphan))
    with pytest.raises(SpecError, match=r"stages.rm needs stages.sft"):
        load_pipeline(tmp_path / "o.yaml")
    with pytest.raises(SpecError, match=r"stages.pretrain.checkpoint: .* is not a checkpoint"):
        load_pipeline(QUICK, [f"stages.pretrain.checkpoint={tmp_path}"])
    no_sft = {**raw, "from_scratch": True, "stages": {"pretrain": raw["stages"]["pretrain"]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(no_sft))
    with pytest.raises(SpecError, match=r"from_scratch needs stages.pretrain .* and a stages.sft spec"):
        load_pipeline(tmp_path / "s.yaml")
    out = subprocess.run([*CLI, "pipeline", str(tmp_path / "p.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "optim.lrr" in out.stderr and "Traceback" not in out.stderr


def test_quickstart_wires_each_export_into_the_next_stage(tmp_path):
    pipe = load_pipeline(QUICK, [f"storage_path={tmp_path}"])
    root = tmp_path.resolve() / "quickstart"
    assert pipe.stage_spec("sft").model.path == str(root / "pretrain" / "model")
    assert pipe.stage_spec("rm").model.path == str(root / "sft" / "model")
    rl = pipe.stage_spec("rl")
    assert rl.model.path == str(root / "sft" / "model")
    assert [s.ref for s in rl.reward.sources if s.kind == "model"] == [str(root / "rm" / "model")]
    # The chain key moves with the spec and with the parent's key.
    assert chain_key("a", "p") != chain_key("a", "q") != chain_key("b", "q")


def test_running_mean_of_the_rl_reward_curve():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0, 4.0], 8) == [2.0, 3.0]
    assert running_mean([], 3) == []


@pytest.mark.slow
def test_pipeline_runs_four_stages_then_a_rerun_skips_them(ray_session, tmp_path):
    pipe = load_pipeline(QUICK, nano_overrides(tmp_path))
    state = run_pipeline(pipe)
    assert [s["status"] for s in state["stages"].values()] == ["done"] * 4
    root = pipe.root()
    rl_export = root / "rl" / "model"
    chain = lineage_chain(rl_export)
    assert [c["stage"] for c in chain] == ["rl", "sft", "pretrain"]
    assert chain[1]["path"] == str(root / "sft" / "model") and chain[-1]["parent"] is None
    rm_chain = lineage_chain(root / "rm")
    assert [c["stage"] for c in rm_chain] == ["rm", "sft", "pretrain"]
    assert "└─ sft" in format_chain(chain)
    cli = subprocess.run([*CLI, "lineage", str(rl_export)], capture_output=True, text=True)
    assert cli.returncode == 0 and "pretrain" in cli.stdout and str(root / "pretrain" / "model") in cli.stdout

    report = write_report(pipe, state)
    text = report.read_text()
    assert "## The same held-out prompts" in text and text.count("\n| `") == 4  # one row per held-out prompt
    means = json.loads((root / "report.json").read_text())["side_by_side_means"]
    assert set(means) == {"pretrain", "sft", "rl"}
    assert all(m["rm"] is not None and 0 <= m["oracle"] <= 1 for m in means.values())
    try:
        import matplotlib  # noqa: F401  (pinned in the cpu extra; without it the report says so)
    except ImportError:
        assert "Plots need matplotlib" in text
    else:
        for png in ("loss.png", "rm_accuracy.png", "rl.png"):
            assert (root / png).stat().st_size > 1000 and f"]({png})" in text

    # Same spec again: nothing runs (the chain key of every stage matches its export).
    again = run_pipeline(load_pipeline(QUICK, nano_overrides(tmp_path)))
    assert [s["status"] for s in again["stages"].values()] == ["skipped"] * 4
