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


def _readme_commands() -> list[list[str]]:
    """Every ``raystages ...`` command in the README's bash blocks, as argv after the program."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        pending = ""
        for line in block.replace("\\\n", " ").splitlines():
            try:  # a quoted argument may span lines (curl -d '{...}')
                tokens = shlex.split(pending + line, comments=True)
            except ValueError:
                pending += line + "\n"
                continue
            pending = ""
            parts, current = [], []
            for tok in tokens:
                if tok in ("&&", ";", "||"):
                    parts.append(current)
                    current = []
                else:
                    current.append(tok)
            for words in [*parts, current]:
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words.pop(0)  # leading VAR=value environment assignments
                if words and words[0].split("/")[-1] == "raystages":
                    commands.append(words[1:])
    return commands


def test_every_readme_command_line_parses_as_shown():
    from raystages.cli import parse_args

    commands = _readme_commands()
    assert len(commands) > 20 and ["pipeline", "jobs/quickstart.yaml"] in commands
    for argv in commands:
        args = parse_args(argv)
        assert args.command == argv[0], argv
    submit = parse_args(["submit", "jobs/quickstart.yaml", "--address", "http://HEAD:8265", "storage_path=/data/runs"])
    assert submit.overrides == ["storage_path=/data/runs"] and submit.address == "http://HEAD:8265"
