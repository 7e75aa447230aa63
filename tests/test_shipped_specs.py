"""Every shipped spec runs where the README says it runs: on 2 CPUs as shipped, or its first
comment says what it needs (the GPU ones). Resolved as a user would run them."""

from __future__ import annotations

import pytest
import yaml

from raystages.resources import needs, shortfall
from tests.conftest import ROOT

LAPTOP = {"CPU": 2.0, "GPU": 0.0}
SHIPPED = sorted(p.name for p in (ROOT / "jobs").glob("*.yaml"))


def _stage_specs(name: str, checkpoint) -> list:
    """The stage specs a shipped file runs: itself, each stage of a pipeline, or a tune base."""
    from raystages.pipeline import load_pipeline
    from raystages.spec import load_spec
    from raystages.tune import load_tune

    path = ROOT / "jobs" / name
    raw = yaml.safe_load(path.read_text())
    if "stages" in raw:
        pipe = load_pipeline(path)
        return [pipe.stage_spec(s) for s in pipe.stages if pipe.checkpoint_of(s) is None]
    if "serve" in raw or name == "serve.yaml":
        return []
    parent = [f"model.path={checkpoint}"] if raw.get("stage") != "pretrain" else []
    if "tune" in raw:
        return [load_tune(path, parent)[0]]
    return [load_spec(path, parent)]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spec_fits_two_cpus_or_says_what_it_needs(name, random_checkpoint):
    first_comment = (ROOT / "jobs" / name).read_text().split("\n\n")[0]
    specs = _stage_specs(name, random_checkpoint)
    gpu = any(s.scaling.use_gpu or needs(s)["GPU"] for s in specs)
    if gpu:
        assert "GPU" in first_comment, f"{name}: a GPU spec says so in its first comment"
        return
    for spec in specs:
        assert shortfall(spec, LAPTOP, LAPTOP) is None, (name, spec.stage, shortfall(spec, LAPTOP, LAPTOP))


def test_a_shortfall_names_the_knobs_to_change(random_checkpoint):
    from raystages.spec import load_spec

    spec = load_spec(ROOT / "jobs" / "grpo.yaml", [f"model.path={random_checkpoint}", "scaling.cpus_per_worker=1"])
    assert needs(spec) == {"CPU": 3.0, "GPU": 0.0}
    msg = shortfall(spec, LAPTOP, LAPTOP)
    assert "rl needs 3 CPU at once" in msg and "rollout.cpus_per_actor" in msg and "has 2" in msg
    big_worker = load_spec(ROOT / "jobs" / "pretrain.yaml", ["scaling.num_workers=1", "scaling.cpus_per_worker=3"])
    assert "pretrain needs 3 CPU at once" in shortfall(big_worker, LAPTOP, LAPTOP)
    # Enough CPUs in all, but no single node can hold one worker:
    assert "largest Ray node has 2" in shortfall(big_worker, {"CPU": 4.0, "GPU": 0.0}, LAPTOP)
