"""The DPO stage's spec (beside its stage, as RL's is): the `dpo:` section and DpoSpec.

Registered on import; ``raystages.registry`` names this module for the ``dpo`` stage.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raystages.spec import LoraSpec, PreferenceFieldsSpec, Section, StageSpec, register


class DpoSection(Section):
    fields: PreferenceFieldsSpec = Field(default_factory=PreferenceFieldsSpec)
    loss: Literal["sigmoid", "ipo", "simpo", "orpo"] = Field(
        "sigmoid", description="`sigmoid`: DPO (cDPO with label_smoothing); `ipo`; `simpo` and `orpo`: reference-free.")
    beta: float = Field(0.1, gt=0, description="DPO/IPO: strength of the pull to the reference (IPO's tau); SimPO: reward scale.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid only: assumed share of flipped labels (conservative DPO).")
    simpo_gamma: float | None = Field(None, ge=0, description="simpo only, required there: target reward margin gamma.")
    orpo_lambda: float = Field(0.1, gt=0, description="orpo only: weight of the odds-ratio term added to the chosen answer's NLL.")
    rpo_alpha: float = Field(0.0, ge=0, description="sigmoid/ipo: weight of the chosen answer's mean NLL added to the loss (RPO, Pang et al. 2024; TRL's rpo_alpha); keeps DPO from lowering the chosen answer too.")
    precompute_ref: bool = Field(False, description="sigmoid/ipo: score every pair with the reference once before training (cached in the run dir, reused on resume) instead of holding it on every worker.")
    eval_prompts: int = Field(100, ge=0, description="Built-in task: held-out prompts answered greedily before and after the stage for exact-match accuracy.")
    max_new_tokens: int = Field(24, ge=1, description="Token budget of those greedy answers.")
    lora: LoraSpec = Field(default_factory=LoraSpec)

    @model_validator(mode="after")
    def _loss_options(self):
        if self.loss == "simpo" and self.simpo_gamma is None:
            raise ValueError("dpo.simpo_gamma: SimPO needs its target reward margin; set dpo.simpo_gamma (the paper uses 0.5-1.6 with beta 2-2.5)")
        if self.loss != "simpo" and self.simpo_gamma is not None:
            raise ValueError(f"dpo.simpo_gamma applies to dpo.loss=simpo only, not {self.loss!r}")
        if self.loss != "sigmoid" and self.label_smoothing:
            raise ValueError(f"dpo.label_smoothing applies to dpo.loss=sigmoid only, not {self.loss!r}")
        if self.rpo_alpha and not self.needs_reference:
            raise ValueError(f"dpo.rpo_alpha applies to dpo.loss=sigmoid or ipo, not {self.loss!r} (orpo has its own NLL term)")
        if self.precompute_ref and not self.needs_reference:
            raise ValueError(f"dpo.precompute_ref: dpo.loss={self.loss!r} uses no reference model")
        return self

    @property
    def needs_reference(self) -> bool:
        return self.loss in ("sigmoid", "ipo")


class DpoSpec(StageSpec):
    """Direct preference optimisation: a policy learns from preference pairs, no reward model, no RL."""

    stage: Literal["dpo"] = "dpo"
    dpo: DpoSection = Field(default_factory=DpoSection)

    @model_validator(mode="after")
    def _needs_checkpoint(self):
        if not self.model.path:
            raise ValueError("model.path: DPO starts from a checkpoint (e.g. runs/sft/model), which is also "
                             "the frozen reference of the sigmoid and ipo losses; set model.path")
        return self


register("dpo", DpoSpec)
