"""Shared fixtures. One Ray instance per test session; runs live under a session tmp dir.

Checkpoints are built once per session and reused: ``random_checkpoint`` (an untrained tiny
model with the built-in tokenizer: seconds), ``pretrained_checkpoint`` (a real Ray Train
pretraining run on the built-in corpus: about a minute) and ``sft_result`` (SFT from it),
so stage tests start from what a user would have.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Real, independently written data (../shared/data beside the checkout); tests that read it
# skip with a reason where it is absent. RAYSTAGES_SHARED_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("RAYSTAGES_SHARED_DATA", ROOT.parent / "shared" / "data"))
# The CLI as a user runs it, from whatever interpreter runs the tests (no .venv path).
CLI = [sys.executable, "-m", "raystages"]
# The built-in task with 3-4 letter problems: a ~1M-parameter model learns it within a
# minute of CPU, so the before/after gap is wide at fixed seeds.
TASK = ["data.builtin.min_len=3", "data.builtin.max_len=4"]


def shared_data(*parts: str) -> Path:
    """A file or folder under the shared data; skips the calling test where it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared real-data folder); absent here")
    return path


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """The session's Ray instance (4 logical CPUs on 2 cores: trainer workers, Ray Data and
    Serve share them; nothing here is CPU-bound enough to need strict accounting)."""
    import ray

    from raystages.train.runner import connect_ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=4, include_dashboard=True, logging_level="WARNING")
    # Everything in this session (state API, CLI subprocesses) talks to this instance, even
    # if another Ray happens to run on the machine.
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    connect_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def builtin_tokenizer_dir(tmp_path_factory) -> Path:
    from raystages.models import train_tokenizer
    from raystages.task.splits import pretrain_texts

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(pretrain_texts("train", 300), 512, out)
    return out


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory, builtin_tokenizer_dir) -> Path:
    """An untrained ``nano`` Llama exported as a Hugging Face checkpoint."""
    from raystages.models import build_causal_lm, export_hf, load_tokenizer
    from raystages.spec import ModelSpec

    tok = load_tokenizer(str(builtin_tokenizer_dir))
    model = build_causal_lm(ModelSpec(preset="nano"), tok, seed=0)
    out = tmp_path_factory.mktemp("ckpt") / "random-nano"
    export_hf(model, tok, out)
    return out


@pytest.fixture(scope="session")
def pretrained_checkpoint(ray_session, runs_dir) -> Path:
    """A tiny model pretrained for real (2 workers, ZeRO-2) on the built-in corpus of 3-4
    letter puzzles, long enough that it learns to solve them (~60% greedy exact match in
    the corpus' own `prompt = answer` form): SFT from a model that has not yet learned the
    skill is slower than from scratch, so a shorter run would make SFT's effect a coin toss."""
    from raystages.spec import load_spec
    from raystages.stages import pretrain

    spec = load_spec(ROOT / "jobs" / "pretrain.yaml", [
        f"run.storage_path={runs_dir}", "run.name=fixture-pretrain", "run.samples=0",
        "optim.max_steps=500", "run.checkpoint_every=1000", "run.eval_every=100",
        "data.builtin.min_len=3", "data.builtin.max_len=4"])
    return pretrain.run(spec).export_dir


@pytest.fixture(scope="session")
def sft_result(pretrained_checkpoint, runs_dir):
    """SFT of the pretrained checkpoint on the built-in task (jobs/sft.yaml, 400 steps): the
    parent of the reward-model and DPO tests."""
    from raystages.spec import load_spec
    from raystages.stages import sft

    spec = load_spec(ROOT / "jobs" / "sft.yaml", [
        f"run.storage_path={runs_dir}", "run.name=test-sft", f"model.path={pretrained_checkpoint}",
        *TASK, "logging.log_every=50", "run.eval_every=100", "run.checkpoint_every=1000"])
    return sft.run(spec)


@pytest.fixture
def no_ray(monkeypatch):
    """Tripwire: a bad spec must fail before the runner connects to Ray."""
    import raystages.train.runner as runner

    def boom():
        raise AssertionError("Ray was started for a bad spec")

    monkeypatch.setattr(runner, "connect_ray", boom)
