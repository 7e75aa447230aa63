"""The serve spec, model discovery, the CLI's refusals (before Ray starts) and the CLI
serving for real (transformers engine, --detach)."""

from __future__ import annotations

import json

import pytest

from raystages.serve.app import find_models
from raystages.serve.cli import main as serve_cli
from raystages.serve.spec import ServeSpec, load_serve_spec
from raystages.spec import SpecError


def _run_dir(root, name, stage, ckpt):
    import shutil

    d = root / name / "model"
    shutil.copytree(ckpt, d)
    (d / "lineage.json").write_text(json.dumps({"stage": stage, "created": "2026-01-02T03:04:05Z"}))
    return root / name


def test_discovery_names_models_by_stage(tmp_path, random_checkpoint):
    runs = tmp_path / "runs"
    _run_dir(runs, "pre", "pretrain", random_checkpoint)
    _run_dir(runs, "tuned", "sft", random_checkpoint)
    _run_dir(runs, "scorer", "rm", random_checkpoint)
    models = {m.name: m for m in find_models([str(runs)], ServeSpec())}
    assert sorted(models) == ["pretrain", "reward", "sft"]
    assert models["sft"].created == 1767323045 and models["sft"].max_model_len == 256
    assert models["sft"].spec.cpus == 0.5
    # name=path wins over lineage; spec defaults and per-model entries apply.
    spec = ServeSpec(defaults={"cpus": 0.25}, models={"mine": {"replicas": 2}})
    [m] = find_models([f"mine={random_checkpoint}"], spec)
    assert (m.name, m.kind, m.spec.replicas, m.spec.cpus) == ("mine", "generate", 2, 0.25)


def test_discovery_errors_name_the_problem(tmp_path, random_checkpoint):
    with pytest.raises(SpecError, match="no lineage.json"):
        find_models([str(random_checkpoint)], ServeSpec())
    with pytest.raises(SpecError, match="not a checkpoint"):
        find_models([str(tmp_path / "missing")], ServeSpec())
    with pytest.raises(SpecError, match="nothing to serve"):
        find_models([], ServeSpec())
    a = _run_dir(tmp_path / "a", "x", "sft", random_checkpoint)
    b = _run_dir(tmp_path / "b", "x", "sft", random_checkpoint)
    with pytest.raises(SpecError, match="two checkpoints for model `sft`"):
        find_models([str(a), str(b)], ServeSpec())
    with pytest.raises(SpecError, match="max_model_len: 4096 exceeds"):
        find_models([f"m={random_checkpoint}"], ServeSpec(models={"m": {"max_model_len": 4096}}))


def test_spec_file_and_overrides(tmp_path):
    from pathlib import Path

    spec = load_serve_spec(Path(__file__).resolve().parents[1] / "jobs" / "serve.yaml", ["defaults.cpus=1", "port=9001"])
    assert spec.port == 9001 and spec.defaults["cpus"] == 1 and spec.host == "127.0.0.1"
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve:\n  port: 0\n  defaults: {cpu: 1}\n  colour: red\n")
    with pytest.raises(SpecError) as e:
        load_serve_spec(bad)
    assert "serve.port" in str(e.value) and "serve.colour" in str(e.value)


def test_cli_refuses_bad_input_with_exit_2(tmp_path, random_checkpoint, capsys):
    assert serve_cli([str(tmp_path / "nope")]) == 2
    assert serve_cli([f"m={random_checkpoint}", "--port", "70000"]) == 2
    assert serve_cli([f"m={random_checkpoint}", "--set", "defaults.cpus=-1"]) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint" in err and "--port" in err and "cpus" in err


def test_cli_serves_and_detaches(ray_session, tmp_path, random_checkpoint, capsys):
    import httpx
    from ray import serve
    from serve_helpers import free_port

    run = _run_dir(tmp_path, "tuned", "sft", random_checkpoint)
    port = free_port()
    try:
        assert serve_cli([str(run), "--engine", "transformers", "--port", str(port), "--api-key", "k",
                          "--set", "defaults.cpus=0.25", "--detach"]) == 0
        out = capsys.readouterr().out
        assert f"http://127.0.0.1:{port}/v1" in out and "sft" in out
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["models"] == ["sft"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", headers={"Authorization": "Bearer k"},
                       json={"prompt": "ab =", "max_tokens": 3, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        serve.shutdown()


def test_engine_errors_reach_the_client_without_internals():
    from raystages.serve.routes import ApiError, as_api_error, engine_error, reject_invalid_text

    trace = ("\x1b[36mray::ServeReplica:app:LLMServer (pid=123, ip=10.0.0.5)\x1b[0m\nTraceback (most recent call last):\n"
             '  File "/venv/lib/python3.11/site-packages/vllm/x.py", line 1\nUnicodeEncodeError: surrogates not allowed')
    err = as_api_error(ValueError(trace), "req-1")
    assert (err.status, err.code) == (400, "invalid_request") and "pid" not in err.message and "\n" not in err.message
    short = engine_error(400, "This model's maximum context length is 256 tokens. (parameter=max_tokens)")
    assert (short.param, short.code) == ("max_tokens", "context_length_exceeded")
    assert "256 tokens" in short.message  # a validator's own one-line message is kept
    assert engine_error(500, trace).message == "The server had an error while processing the request."
    with pytest.raises(ApiError) as bad:
        reject_invalid_text({"prompt": "ok", "messages": [{"role": "user", "content": "a\ud800b"}]})
    assert (bad.value.status, bad.value.param) == (400, "messages.0.content")
    reject_invalid_text({"prompt": ["fine", "naïve ☃"], "stop": None})
