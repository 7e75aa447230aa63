"""The four-stage pipeline in one spec: pretrain -> SFT -> reward model -> RL, then a report.

    raystages pipeline jobs/quickstart.yaml [storage_path=/data/runs stages.rl.algo.iterations=5 ...]
    raystages lineage runs/quickstart/rl/model

Each section under ``stages:`` is that stage's own spec (as in ``jobs/<stage>.yaml``), or
``{checkpoint: DIR}`` to use an existing checkpoint instead of running the stage. The
pipeline sets what chains them: every stage runs in ``storage_path/name/<stage>``; SFT
starts from the pretrained export, the reward model and RL from the SFT export, and RL's
reward sources of kind ``model`` without a ``ref`` score with the reward model. With
``from_scratch: true`` the SFT spec also runs, as ``sft-scratch``, from fresh weights of the
pretrained model's architecture (same tokenizer, spec and budget), and the report sets the two
side by side: what pretraining is worth downstream.

A rerun skips a stage whose export exists for the same chain key (its spec hash and its
parent's key, so a changed upstream stage reruns everything after it) and resumes an
interrupted one from its last Ray Train checkpoint (same run dir). ``pipeline.json`` holds
the state; ``report.md`` (+ PNG plots) the result.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raystages import atomic

from raystages.models import fresh_weights
from raystages.registry import ORDER, STAGES, stage_module
from raystages.spec import (SpecError, StageSpec, apply_overrides, parse_spec, read_yaml_mapping,
                            validation_lines)
from raystages.train.console import begin_stage, finished_line

PARENT = {name: s.parent for name, s in STAGES.items() if s.parent}
SCRATCH = "sft-scratch"  # the run of stages.sft from fresh weights (from_scratch: true)


class ReportSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: int = Field(8, ge=0, description="Held-out task prompts answered side by side by the pretrained, SFT and RL models.")
    max_new_tokens: int = Field(16, ge=1, description="Token budget of those greedy answers.")
    plots: bool = Field(True, description="PNG plots (loss curves, RM accuracy, RL reward/KL) when matplotlib is installed.")


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("pipeline", pattern=r"^[A-Za-z0-9_.-]+$", description="Pipeline name: its stages run in storage_path/name/<stage>.")
    storage_path: str = Field("runs", description="Where the pipeline's runs live (shared storage on a cluster).")
    stages: dict[str, dict[str, Any]] = Field(description="pretrain/sft/rm/rl: each the stage's spec, or {checkpoint: DIR}.")
    from_scratch: bool = Field(False, description="Also run stages.sft from fresh weights of the pretrained model's architecture (run `sft-scratch`: same tokenizer, spec and budget) and compare the two in the report.")
    report: ReportSpec = Field(default_factory=ReportSpec)

    @model_validator(mode="after")
    def _stages(self):
        unknown = [s for s in self.stages if s not in ORDER]
        if unknown:
            raise ValueError(f"stages: {unknown} not among {list(ORDER)}")
        for stage in self.stages:
            parent = PARENT.get(stage)
            if parent and parent not in self.stages:
                raise ValueError(f"stages.{stage} needs stages.{parent} (a spec or {{checkpoint: DIR}})")
        if self.from_scratch and not ("pretrain" in self.stages and "sft" in self.stages
                                      and "checkpoint" not in self.stages["sft"]):
            raise ValueError("from_scratch needs stages.pretrain (a spec or {checkpoint: DIR}) and a stages.sft spec")
        return self

    def root(self) -> Path:
        return Path(self.storage_path).resolve() / self.name

    def checkpoint_of(self, stage: str) -> Path | None:
        given = self.stages[stage].get("checkpoint")
        return Path(given).resolve() if given else None

    def export_of(self, stage: str) -> Path:
        return self.checkpoint_of(stage) or self.root() / stage / "model"

    def scratch_init(self) -> Path:
        """Where the fresh weights of the from-scratch SFT run are written."""
        return self.root() / f"{SCRATCH}-init"

    def stage_spec(self, stage: str, from_scratch: bool = False) -> StageSpec:
        """The stage's spec with the pipeline's wiring applied (``from_scratch``: the SFT run
        from fresh weights)."""
        raw = copy.deepcopy(self.stages[stage])
        if "checkpoint" in raw:
            raise SpecError(f"stages.{stage} is a given checkpoint, not a run")
        raw.setdefault("run", {}).update(name=SCRATCH if from_scratch else stage, storage_path=str(self.root()))
        if from_scratch:
            raw.setdefault("model", {})["path"] = str(self.scratch_init())
        elif stage in PARENT:
            raw.setdefault("model", {})["path"] = str(self.export_of(PARENT[stage]))
        if stage == "rl":
            sources = raw.setdefault("reward", {}).setdefault("sources", [{"kind": "oracle"}])
            for s in sources:
                if isinstance(s, dict) and s.get("kind") == "model" and not s.get("ref"):
                    if "rm" not in self.stages:
                        raise SpecError("stages.rl.reward.sources: a `model` source without ref needs stages.rm")
                    s["ref"] = str(self.export_of("rm"))
        return parse_spec(raw, stage, source=f"stages.{stage}")


def load_pipeline(path, overrides=()) -> PipelineSpec:
    """Read and validate a pipeline spec; every run stage's spec is validated too (a missing
    upstream checkpoint is fine here: it is made by the run)."""
    p = Path(path)
    raw = read_yaml_mapping(p)
    if "stages" not in raw:
        raise SpecError(f"{p}: a pipeline spec has a `stages:` mapping (pretrain, sft, rm, rl)")
    raw = apply_overrides(raw, list(overrides))
    try:
        pipe = PipelineSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{p}: invalid pipeline spec\n" + validation_lines(e)) from None
    for stage in pipe.stages:
        ckpt = pipe.checkpoint_of(stage)
        if ckpt is not None:
            if not (ckpt / "config.json").is_file():
                raise SpecError(f"{p}: stages.{stage}.checkpoint: {str(ckpt)!r} is not a checkpoint directory")
            continue
        try:
            pipe.stage_spec(stage)
        except SpecError as e:
            raise SpecError(f"{p}: {e}") from None
    return pipe


def preflight_pipeline(pipe: PipelineSpec) -> None:
    """Every stage's preflight before the first starts; paths that an earlier stage of the
    pipeline will write need not exist yet. (The from-scratch run is stages.sft with only
    the pipeline's own model.path and run name changed: sft's preflight covers it.)"""
    from raystages.preflight import preflight

    for stage in (s for s in ORDER if s in pipe.stages and pipe.checkpoint_of(s) is None):
        produced = set()
        if PARENT.get(stage) in pipe.stages and pipe.checkpoint_of(PARENT[stage]) is None:
            produced.add("model.path")
        if stage == "rl" and "rm" in pipe.stages and pipe.checkpoint_of("rm") is None:
            produced.add("reward.sources")
        preflight(pipe.stage_spec(stage), frozenset(produced), source=f"stages.{stage}")


def chain_key(spec_hash: str, parent_key: str | None) -> str:
    return hashlib.sha256(f"{spec_hash}|{parent_key or ''}".encode()).hexdigest()[:16]


def _given_key(ckpt: Path) -> str:
    lineage = ckpt / "lineage.json"
    blob = lineage.read_text() if lineage.is_file() else str(ckpt)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_pipeline(pipe: PipelineSpec, say=print) -> dict:
    """Run (or skip, or resume) each stage in order; returns the pipeline state."""
    root = pipe.root()
    root.mkdir(parents=True, exist_ok=True)
    state_path = root / "pipeline.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"stages": {}}
    (root / "pipeline.yaml").write_text(yaml.safe_dump(pipe.model_dump(mode="json"), sort_keys=False))
    keys: dict[str, str] = {}

    def run(label: str, stage: str, spec: StageSpec, key: str, prepare=None) -> None:
        """Run one stage under ``label`` in the state, unless its export is up to date."""
        export = spec.run_dir() / "model"
        prev = state["stages"].get(label, {})
        if prev.get("key") == key and prev.get("status") in ("done", "skipped") and (export / "lineage.json").is_file():
            prev["status"] = "skipped"
            say(f"{label}: up to date ({export}), skipped")
            return
        if prev.get("key") not in (None, key):
            # The spec or an upstream stage changed: this stage's old run must not resume.
            _archive(spec.run_dir())
        state["stages"][label] = {"status": "running", "key": key, "export": str(export), "started": time.time()}
        _save(state_path, state)
        begin_stage()
        if prepare is not None:
            prepare()
        result = stage_module(stage).run(spec)
        state["stages"][label] = {"status": "done", "key": key, "export": str(result.export_dir),
                                  "wall_s": round(time.time() - state["stages"][label]["started"], 1),
                                  "metrics": _scalars(result.metrics)}
        _save(state_path, state)
        say(finished_line(label, {**result.metrics, "wall_s": state["stages"][label]["wall_s"]},
                          result.export_dir).removeprefix("raystages: "))

    for stage in (s for s in ORDER if s in pipe.stages):
        parent_key = keys.get(PARENT.get(stage, ""), None)
        ckpt = pipe.checkpoint_of(stage)
        if ckpt is not None:
            keys[stage] = _given_key(ckpt)
            state["stages"][stage] = {"status": "given", "export": str(ckpt), "key": keys[stage]}
            say(f"{stage}: using the given checkpoint {ckpt}")
            continue
        spec = pipe.stage_spec(stage)
        keys[stage] = chain_key(spec.digest(), parent_key)
        run(stage, stage, spec, keys[stage])
        if stage == "sft" and pipe.from_scratch:
            spec = pipe.stage_spec(stage, from_scratch=True)
            run(SCRATCH, stage, spec, chain_key(spec.digest(), parent_key),
                prepare=lambda: fresh_weights(pipe.export_of("pretrain"), pipe.scratch_init(), spec.run.seed))
    return state


def _archive(run_dir: Path) -> None:
    if run_dir.exists():
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.old-{int(time.time())}"))


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


def _save(path: Path, state: dict) -> None:
    atomic.write_text(path, json.dumps(state, indent=2, default=str))


def lineage_chain(checkpoint) -> list[dict]:
    """The checkpoint's lineage, then its parent's, back to a checkpoint with no parent."""
    chain, seen = [], set()
    path = Path(checkpoint).resolve()
    if (path / "model" / "lineage.json").is_file():  # a run dir works too
        path = path / "model"
    while path is not None and str(path) not in seen:
        seen.add(str(path))
        f = path / "lineage.json"
        if not f.is_file():
            chain.append({"stage": "(external)", "path": str(path)})
            break
        lin = json.loads(f.read_text())
        chain.append({**lin, "path": str(path)})
        parent = lin.get("parent_lineage")
        parent = Path(parent).parent if parent else (Path(lin["parent"]) if lin.get("parent") else None)
        if parent is not None and not parent.exists():
            chain.append({"stage": "(missing)", "path": str(parent)})
            break
        path = parent
    return chain


def format_chain(chain: list[dict]) -> str:
    keys = ("val_loss", "pair_accuracy", "accuracy_after", "reward_after", "step", "iterations")
    lines = []
    for i, link in enumerate(chain):
        metrics = link.get("metrics") or {}
        shown = ", ".join(f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
                          for k in keys if k in metrics)
        head = f"{'  ' * i}{'└─ ' if i else ''}{link['stage']:<9}"
        extra = f" spec {link['spec_hash']} · {link.get('created', '')}" if "spec_hash" in link else ""
        lines.append(f"{head} {link['path']}{extra}" + (f"\n{'  ' * i}   {shown}" if shown else ""))
    return "\n".join(lines)
