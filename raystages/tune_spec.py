"""The ``tune:`` block of a stage spec: what Ray Tune searches, and how.

    tune:
      metric: val_loss          # any metric the stage reports (val_loss, val_accuracy, ...)
      mode: min
      num_samples: 1            # repeats of the grid; random draws for the other kinds
      max_concurrent: 2
      scheduler: fifo           # or asha: stops weak trials at rungs of reports
      search_space:             # dotted spec keys -> exactly one of:
        optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
        optim.warmup_steps: {grid: [0, 20]}
        deepspeed.zero_stage: {choice: [1, 2]}
        optim.weight_decay: {uniform: [0.0, 0.1]}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AshaSpec(_Section):
    grace_period: int = Field(1, ge=1, description="Reports a trial always gets before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="1/reduction_factor of the trials go on at each rung.")
    max_t: int = Field(100, ge=1, description="Most reports a trial makes (checkpoints + the final one).")


class TuneSpec(_Section):
    metric: str = Field("val_loss", description="Metric the trials are ranked by (as the stage reports it).")
    mode: Literal["min", "max"] = Field("min", description="Whether a lower or a higher metric is better.")
    num_samples: int = Field(1, ge=1, description="Samples of the search space (the grid is repeated this many times).")
    max_concurrent: int = Field(2, ge=1, description="Trials running at once.")
    scheduler: Literal["fifo", "asha"] = Field("fifo", description="fifo runs every trial to the end; asha stops weak ones early.")
    asha: AshaSpec = Field(default_factory=AshaSpec)
    trial_cpus: float = Field(0.05, gt=0, description="CPUs the trial driver itself holds (its Ray Train workers reserve their own).")
    stop: dict[str, float] = Field(default_factory=dict, description="Upper bounds on reported metrics: a trial that reports more is stopped (e.g. {kl_ref: 5.0, response_len: 60} for RL blow-ups).")
    search_space: dict[str, dict[str, Any]] = Field(description="Dotted spec key -> {grid|choice: [values]} or {uniform|loguniform|randint: [low, high]}.")

    @model_validator(mode="after")
    def _space(self):
        if not self.search_space:
            raise ValueError("search_space: name at least one dotted spec key to search over")
        for key, dom in self.search_space.items():
            if len(dom) != 1 or next(iter(dom)) not in KINDS:
                raise ValueError(f"search_space.{key}: give exactly one of {list(KINDS)}, got {sorted(dom)}")
            (kind, vals), = dom.items()
            if not isinstance(vals, list) or not vals:
                raise ValueError(f"search_space.{key}.{kind}: expected a non-empty list")
            if kind in ("uniform", "loguniform", "randint"):
                if len(vals) != 2 or not all(isinstance(v, (int, float)) for v in vals) or vals[0] >= vals[1]:
                    raise ValueError(f"search_space.{key}.{kind}: expected [low, high] numbers with low < high")
                if kind == "loguniform" and vals[0] <= 0:
                    raise ValueError(f"search_space.{key}.loguniform: low must be > 0")
        return self

    def candidates(self, key: str) -> list:
        """Values to validate the stage spec with before any trial starts."""
        (kind, vals), = self.search_space[key].items()
        return list(vals) if kind in ("grid", "choice") else [vals[0], vals[1] if kind != "randint" else vals[1] - 1]

    def param_space(self) -> dict:
        from ray import tune

        make = {"grid": tune.grid_search, "choice": tune.choice,
                "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
                "randint": lambda v: tune.randint(*v)}
        return {key: make[kind](vals) for key, dom in self.search_space.items() for kind, vals in dom.items()}
