"""The README's spec reference is generated from the specs and must stay in sync; .ci/run
runs the README's test command."""

from raystages.specdoc import render_readme
from tests.conftest import ROOT


def test_readme_spec_reference_is_current():
    text = (ROOT / "README.md").read_text()
    assert "spec-reference:pretrain" in text
    assert render_readme(text) == text, "run: python -m raystages.specdoc README.md"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "bash .ci/setup && .venv/bin/python -m pytest -q tests"
    assert command in readme and command in ci


def test_readme_main_command_runs_a_spec_that_validates():
    from raystages.pipeline import load_pipeline

    readme = (ROOT / "README.md").read_text()
    command = "bash .ci/setup && .venv/bin/raystages pipeline jobs/quickstart.yaml"
    assert command in readme
    pipe = load_pipeline(ROOT / "jobs" / "quickstart.yaml")
    assert list(pipe.stages) == ["pretrain", "sft", "rm", "rl"]
