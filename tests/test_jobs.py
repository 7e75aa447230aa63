"""Ray Jobs for real: a private `ray start --head` with token auth, `raystages submit` runs a
pretraining stage on it to SUCCEEDED, a long one is stopped, and a wrong address or a
missing token fail fast with a message that says what to do."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from raystages import jobs
from tests.conftest import ROOT
from tests.ray_head import VENV_BIN, start_head, stop_head

NANO = ["model.preset=nano", "run.samples=0", "optim.seq_len=64", "optim.micro_batch_size=8",
        "data.builtin.num_train=400", "data.builtin.num_val=40", "logging.log_every=5",
        "run.eval_every=1000", "scaling.cpus_per_worker=0.5", "logging.tensorboard=false"]


def raystages(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "raystages"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


# --- no cluster needed ---------------------------------------------------------------------

def test_submission_id_is_deterministic_and_follows_the_spec():
    a = jobs.plan("jobs/pretrain.yaml", ["optim.max_steps=20"])
    b = jobs.plan("jobs/pretrain.yaml", ["optim.max_steps=20"])
    c = jobs.plan("jobs/pretrain.yaml", ["optim.max_steps=21"])
    assert a.submission_id == b.submission_id != c.submission_id
    assert re.fullmatch(r"raystages-pretrain-pretrain-[0-9a-f]{8}", a.submission_id)


def test_pipeline_and_tune_specs_submit_as_their_commands():
    pipe = jobs.plan(str(ROOT / "jobs/quickstart.yaml"), ["stages.rl.algo.iterations=3"])
    assert pipe.command == "pipeline" and pipe.name == "quickstart"
    jobs.storage_override(pipe, "http://127.0.0.1:8265")  # relative runs/ pinned on a local head
    assert pipe.extra_overrides == [f"storage_path={Path('runs').resolve()}"]
    tune = jobs.plan(str(ROOT / "jobs/tune-pretrain.yaml"), [])
    assert tune.command == "tune" and tune.submission_id.startswith("raystages-tune-tune-pretrain-")
    remote = jobs.plan(str(ROOT / "jobs/pretrain.yaml"), [])
    jobs.storage_override(remote, "http://10.0.0.10:8265")  # remote: left alone, with a note
    assert remote.extra_overrides == []


def test_runtime_env_uploads_the_project_without_venv_runs_git(tmp_path):
    sub = jobs.plan(str(ROOT / "jobs/pretrain.yaml"), ["optim.lr=1e-3"])
    entry, renv = jobs.runtime_env(sub, False, {"A": "1"}, ["rich"], tmp_path)
    assert entry == "python -m raystages.cli pretrain jobs/pretrain.yaml optim.lr=1e-3"
    assert renv["working_dir"] == str(ROOT) and {".venv", "runs", ".git"} <= set(renv["excludes"])
    assert renv["env_vars"]["A"] == "1" and renv["pip"] == ["rich"]
    entry, renv = jobs.runtime_env(sub, True, {}, [], tmp_path)
    assert entry.startswith("raystages pretrain pretrain.yaml") and (tmp_path / "pretrain.yaml").is_file()
    assert renv["working_dir"] == str(tmp_path) and "excludes" not in renv


def test_submit_rejects_bad_input_before_contacting_anything(tmp_path):
    outside = tmp_path / "p.yaml"
    outside.write_text((ROOT / "jobs/pretrain.yaml").read_text())
    bad = raystages("submit", "jobs/pretrain.yaml", "optim.lr=-1", "--address", "http://127.0.0.1:9")
    assert bad.returncode == 2 and "optim.lr" in bad.stderr and "Traceback" not in bad.stderr
    with pytest.raises(jobs.JobsError, match="inside the project"):
        jobs.runtime_env(jobs.plan(str(outside), []), False, {}, [], tmp_path)


def test_wrong_address_fails_fast_with_a_clear_message():
    from tests.ray_head import free_ports

    (port,) = free_ports(1)
    out = raystages("submit", "jobs/pretrain.yaml", "--address", f"http://127.0.0.1:{port}", timeout=60)
    assert out.returncode == 1, out
    assert f"no Ray cluster at http://127.0.0.1:{port}" in out.stderr and "ray start --head" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_cluster_that_goes_away_is_reported_not_a_traceback():
    import requests

    from tests.ray_head import free_ports

    (port,) = free_ports(1)
    with pytest.raises(jobs.JobsError, match="lost the Ray cluster .*ConnectionError"):
        jobs.call(requests.get, f"http://127.0.0.1:{port}/api/jobs/x", timeout=5)


# --- a real head ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def head():
    h = start_head(num_cpus=2)
    yield h
    stop_head(h)


@pytest.mark.slow
def test_missing_or_wrong_token_is_rejected_with_what_to_do(head, tmp_path):
    env = head.env(HOME=str(tmp_path))  # no ~/.ray/auth_token to fall back on
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key)
    missing = raystages("submit", "jobs/pretrain.yaml", "--address", head.address, env=env, timeout=120)
    wrong = raystages("submit", "jobs/pretrain.yaml", "--address", head.address,
                      env={**env, "RAY_AUTH_TOKEN": "not-the-token"}, timeout=120)
    for out in (missing, wrong):
        assert out.returncode == 1, out
        assert "token authentication" in out.stderr and "RAY_AUTH_TOKEN" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_submit_runs_a_stage_to_succeeded_and_leaves_its_checkpoint(head, tmp_path):
    args = ["jobs/pretrain.yaml", *NANO, "optim.max_steps=20", "run.checkpoint_every=20",
            f"run.storage_path={tmp_path}", "run.name=jobs-nano", "--address", head.address]
    out = raystages("submit", *args, env=head.env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sid = jobs.plan(str(ROOT / "jobs/pretrain.yaml"), args[1:-2]).submission_id
    assert f"submitted {sid}" in out.stderr and "SUCCEEDED" in out.stderr
    assert "raystages: pretrain finished" in out.stdout  # the job's own log, streamed back
    export = tmp_path / "jobs-nano" / "model"
    lineage = json.loads((export / "lineage.json").read_text())
    assert lineage["metrics"]["step"] == 20 and (export / "model.safetensors").is_file()
    status = raystages("status", sid, "--address", head.address, env=head.env())
    assert status.returncode == 0 and f"{sid}  SUCCEEDED" in status.stdout
    # The same run again is recognised by its id, not started twice.
    again = raystages("submit", *args, env=head.env())
    assert again.returncode == 2 and "already ran (SUCCEEDED)" in again.stderr


@pytest.mark.slow
def test_a_long_job_is_stopped(head, tmp_path):
    args = ["jobs/pretrain.yaml", *NANO, "optim.max_steps=100000", f"run.storage_path={tmp_path}",
            "run.name=jobs-long", "--address", head.address, "--no-wait"]
    out = raystages("submit", *args, env=head.env())
    assert out.returncode == 0, out.stderr
    sid = out.stdout.strip().splitlines()[-1]
    assert sid.startswith("raystages-pretrain-jobs-long-")
    for _ in range(300):
        st = raystages("status", sid, "--address", head.address, env=head.env())
        if "RUNNING" in st.stdout:
            break
        time.sleep(1)
    assert f"{sid}  RUNNING" in st.stdout, st
    stop = raystages("stop", sid, "--address", head.address, env=head.env())
    assert stop.returncode == 0 and f"{sid}  STOPPED" in stop.stdout, stop
    logs = raystages("logs", sid, "--address", head.address, env=head.env())
    assert logs.returncode == 0
    assert not (tmp_path / "jobs-long" / "model").exists()
