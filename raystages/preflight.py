"""Checks that need the machine where a job runs: files, checkpoints, importable code.

Specs (``raystages.spec``) only parse and check shapes and values, so the same spec
validates on a laptop and on the cluster whose storage holds its paths. ``preflight(spec)``
runs where the job runs, before Ray starts: every stage's ``run`` begins with it (so
``raystages <stage>``, a pipeline stage, a Tune trial and a submitted job all get it), and
``raystages pipeline`` / ``tune`` check every stage up front. A problem is a SpecError
naming the field, which the CLI turns into exit 2.

A stage module may add its own checks as ``preflight(spec, produced) -> list[str]``.
"""

from __future__ import annotations

import re
from pathlib import Path

from raystages.spec import SpecError, StageSpec

HUB_ID = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")


def checkpoint_problem(field: str, path: str, what: str = "a checkpoint") -> str | None:
    """Why ``path`` cannot be loaded as ``what``, or None (a hub id is left to the loader)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return None if (p / "config.json").is_file() else (
            f"{field}: {path!r} is not {what} directory (no config.json)")
    if p.exists() or not HUB_ID.fullmatch(path):
        return (f"{field}: {path!r} does not exist: run the previous stage first "
                "(e.g. `raystages pretrain jobs/pretrain.yaml`) or point it at a checkpoint")
    return None


def problems(spec: StageSpec, produced: frozenset[str] = frozenset()) -> list[str]:
    """Every problem of ``spec`` on this machine; ``produced``: fields whose paths an earlier
    pipeline stage creates, so they need not exist yet (``model.path``, ``reward.sources``)."""
    from raystages.data.sources import check_source
    from raystages.models import context_length
    from raystages.registry import stage_module

    out = []
    for name in ("source", "val_source"):
        value = getattr(spec.data, name)
        problem = check_source(value) if value is not None else None
        if problem:
            out.append(f"data.{name}: {problem}")
    path = spec.model.path
    if path and "model.path" not in produced:
        problem = checkpoint_problem("model.path", path)
        if problem:
            out.append(problem)
        else:
            ctx = context_length(None, path, spec.model.config_overrides)
            if ctx is not None and spec.optim.seq_len > ctx:
                out.append(f"optim.seq_len {spec.optim.seq_len} exceeds the model's context of {ctx} tokens")
    stage_checks = getattr(stage_module(spec.stage), "preflight", None)
    if stage_checks is not None:
        out.extend(stage_checks(spec, produced))
    return out


def preflight(spec: StageSpec, produced: frozenset[str] = frozenset(), source: str | None = None) -> None:
    """SpecError listing every problem of ``spec`` on this machine; nothing when it can run."""
    found = problems(spec, produced)
    if found:
        where = f"{source}: " if source else ""
        raise SpecError(f"{where}{spec.stage} cannot run here\n" + "\n".join(f"  {p}" for p in found))
