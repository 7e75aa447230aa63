"""The one list of stages: the CLI, the pipeline, Ray Jobs, Tune, serve and bench read it.

A stage ``NAME`` is the module ``raystages.stages.NAME`` with ``run(spec) -> StageResult``
and a spec class that its ``spec_module`` registers in ``raystages.spec.SPECS`` under the
same name (imported when a spec of that stage is first parsed). Adding a stage is one
entry here plus those two.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class StageInfo:
    name: str
    help: str
    parent: str | None  # the stage whose export it starts from in a pipeline
    served_as: str  # its model id under `raystages serve`
    spec_module: str = "raystages.spec"  # the module that registers its spec class


STAGES: dict[str, StageInfo] = {s.name: s for s in (
    StageInfo("pretrain", "stage 1: causal LM on packed text blocks", None, "pretrain"),
    StageInfo("sft", "stage 2: supervised fine-tuning, loss on answer tokens", "pretrain", "sft"),
    StageInfo("rm", "stage 3: reward model (scalar head, pairwise loss)", "sft", "reward"),
    StageInfo("dpo", "stage 3b: DPO / IPO / SimPO / ORPO on preference pairs, no reward model", "sft", "dpo",
              "raystages.stages.dpo_spec"),
    StageInfo("rl", "stage 4: PPO / GRPO / RLOO with vLLM rollouts", "sft", "rl", "raystages.rl.spec"),
)}
# Pipeline order: a stage runs after its parent.
ORDER: tuple[str, ...] = tuple(STAGES)


def stage_module(name: str):
    """``raystages.stages.<name>``: the module whose ``run(spec)`` runs the stage."""
    return importlib.import_module(f"raystages.stages.{name}")
