"""Ray Tune over any stage: ``raystages tune jobs/<spec>.yaml`` with a ``tune:`` block.

    raystages tune jobs/tune-pretrain.yaml [key=value ...]

Each trial is a driver function (Ray Train V2's pattern for Tune) that runs the stage's own
``run(spec)`` with the trial's values set on the spec; for the Ray Train stages the
TorchTrainer it builds carries a ``TuneReportCallback``, so every checkpoint report reaches
Tune (and ASHA can stop a weak trial). RL, which runs its own actors, is followed through
the ``metrics.jsonl`` it writes. A trial that crashes is recorded with its error and the
others go on. Output in ``run_dir``: ``tune_results.md`` / ``.json`` (one row per trial),
``best.yaml`` (the best trial's spec, ready to run), and the best trial's checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from raystages import atomic
from raystages.spec import (SpecError, StageSpec, apply_overrides, parse_spec, read_yaml_mapping, set_dotted,
                            validation_lines)
from raystages.registry import stage_module
from raystages.resources import pieces
from raystages.tune_spec import TuneSpec


@dataclass
class TuneResult:
    rows: list[dict]
    best_config: dict
    best_metric: float
    best_spec: Path
    best_checkpoint: Path | None
    table: str


def trial_spec(base: dict, values: dict, stage: str, source: str = "<tune>") -> StageSpec:
    raw = copy.deepcopy(base)
    for key, value in values.items():
        set_dotted(raw, key, value)
    return parse_spec(raw, stage, source=source)


def load_tune(path, overrides=(), stage: str | None = None) -> tuple[StageSpec, TuneSpec]:
    """The stage spec and its ``tune:`` block; every candidate value of the search space is
    checked against the spec here, so a typo'd key fails before any trial starts."""
    p = Path(path)
    raw = read_yaml_mapping(p)
    raw = apply_overrides(raw, list(overrides))
    if not isinstance(raw.get("tune"), dict):
        raise SpecError(f"{p}: tune: a tune run needs a `tune:` block (metric, mode, search_space)")
    tune_raw = raw.pop("tune")
    spec = parse_spec(raw, stage, source=str(p))
    try:
        tune = TuneSpec.model_validate(tune_raw)
    except ValidationError as e:
        raise SpecError(f"{p}: invalid tune block\n" + validation_lines(e, "tune.")) from None
    base = spec.model_dump(mode="json")
    for key in tune.search_space:
        for value in tune.candidates(key):
            try:
                trial_spec(base, {key: value}, spec.stage)
            except SpecError as e:
                raise SpecError(f"{p}: tune.search_space.{key}={value!r} gives an invalid spec:\n"
                                + str(e).split("\n", 1)[-1]) from None
    return spec, tune


def _follow_metrics_log(run_dir: Path, done: threading.Event, report) -> None:
    """Report each new line of ``metrics.jsonl`` until ``done``: for stages without a trainer."""
    path, seen = run_dir / "metrics.jsonl", 0
    while True:
        finished = done.is_set()
        lines = path.read_text().splitlines() if path.exists() else []
        for line in lines[seen:]:
            report({k: v for k, v in json.loads(line).items() if isinstance(v, (int, float))})
        seen = len(lines)
        if finished:
            return
        time.sleep(0.5)


def _trial(config: dict, base: dict, stage: str, trials_dir: str) -> None:
    from ray import tune

    values = {k: v for k, v in config.items()}
    raw = copy.deepcopy(base)
    trial_id = tune.get_context().get_trial_id()
    set_dotted(raw, "run.name", trial_id)
    set_dotted(raw, "run.storage_path", trials_dir)
    spec = trial_spec(raw, values, stage)
    if spec.stage != "rl" and spec.run.checkpoint_every % spec.run.eval_every:
        # Tune sees the checkpoint reports: evaluate on each so they all carry val_* metrics.
        spec.run.eval_every = spec.run.checkpoint_every
    module = stage_module(stage)
    if stage == "rl":
        # RL runs its own actors (no TorchTrainer to carry the callback): run it in a thread
        # and report its metrics.jsonl from this, the trial's own thread.
        done, result = threading.Event(), {}

        def work():
            try:
                result["r"] = module.run(spec)
            except BaseException as e:  # re-raised below, in the trial's thread
                result["e"] = e
            finally:
                done.set()

        threading.Thread(target=work, daemon=True).start()
        _follow_metrics_log(spec.run_dir(), done, tune.report)
        if "e" in result:
            raise result["e"]
        final = result["r"]
    else:
        from ray.tune.integration.ray_train import TuneReportCallback

        from raystages.train.runner import trainer_callbacks

        with trainer_callbacks([TuneReportCallback()]):
            final = module.run(spec)
    metrics = {k: v for k, v in final.metrics.items() if isinstance(v, (int, float))}
    tune.report({**metrics, "export_dir": str(final.export_dir)})


def _trial_resources(spec: StageSpec, t: TuneSpec):
    """What one trial reserves. A Ray Train stage's trainer places its own workers, so the
    trial holds only ``trial_cpus``. RL's rollout and learner actors are plain actors, which
    Tune captures into the trial's placement group: it gets a bundle for each of them."""
    from ray import tune

    if spec.stage != "rl":
        return {"cpu": t.trial_cpus}
    bundles = [{"CPU": t.trial_cpus}]
    for _, count, one, _ in reversed(pieces(spec)):  # rollout actors, then learner workers
        bundles += [{res: amount for res, amount in one.items() if amount}] * count
    return tune.PlacementGroupFactory(bundles, strategy="PACK")


def _scheduler(t: TuneSpec):
    if t.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="training_iteration", max_t=t.asha.max_t,
                             grace_period=t.asha.grace_period, reduction_factor=t.asha.reduction_factor)
    return None


def run_tune(spec: StageSpec, t: TuneSpec) -> TuneResult:
    from ray import tune

    from raystages.train.runner import connect_ray, save_run_spec

    run_dir = spec.run_dir()
    save_run_spec(spec)
    (run_dir / "tune.yaml").write_text(yaml.safe_dump(t.model_dump(mode="json"), sort_keys=False))
    connect_ray()
    bounds = dict(t.stop)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=spec.model_dump(mode="json"), stage=spec.stage,
                             trials_dir=str(run_dir / "trials")),
        _trial_resources(spec, t))
    tuner = tune.Tuner(
        trainable, param_space=t.param_space(),
        tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, num_samples=t.num_samples,
                                    max_concurrent_trials=t.max_concurrent, scheduler=_scheduler(t)),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(run_dir), verbose=1,
            failure_config=tune.FailureConfig(max_failures=0),  # a crash is recorded, not retried
            stop=(lambda _id, r: any(r.get(k, -math.inf) > v for k, v in bounds.items())) if bounds else None))
    grid = tuner.fit()
    return summarize(spec, t, grid, run_dir)


def summarize(spec: StageSpec, t: TuneSpec, grid, run_dir: Path) -> TuneResult:
    keys = list(t.search_space)
    rows = []
    for r in grid:
        m = r.metrics or {}
        err = None
        if r.error is not None:
            err = (str(r.error).strip().splitlines() or [type(r.error).__name__])[-1][:200]
        rows.append({"trial": m.get("trial_id") or Path(r.path).name,
                     **{k: r.config.get(k) for k in keys},
                     t.metric: m.get(t.metric), "step": m.get("step"), "reports": m.get("training_iteration"),
                     "status": "ERROR" if err else "OK", "error": err, "export_dir": m.get("export_dir")})
    ok = [row for row in rows if row["status"] == "OK" and isinstance(row[t.metric], (int, float))]
    if not ok:
        raise RuntimeError(f"every tune trial failed; first error: {rows[0]['error'] if rows else 'no trials'}")
    best = (min if t.mode == "min" else max)(ok, key=lambda row: row[t.metric])
    best_values = {k: best[k] for k in keys}
    best_raw = copy.deepcopy(spec.model_dump(mode="json"))
    for k, v in best_values.items():
        set_dotted(best_raw, k, v)
    best_raw["run"]["name"] = f"{spec.run.name}-best"
    best_spec = run_dir / "best.yaml"
    header = (f"# Best of `raystages tune` ({t.metric} {t.mode} = {best[t.metric]:.6g}): "
              + ", ".join(f"{k}={v}" for k, v in best_values.items())
              + f"\n# raystages {spec.stage} {best_spec}\n")
    atomic.write_text(best_spec, header + yaml.safe_dump(best_raw, sort_keys=False))
    table = _markdown(rows, keys, t.metric)
    atomic.write_text(run_dir / "tune_results.md", table)
    atomic.write_text(run_dir / "tune_results.json", json.dumps(
        {"metric": t.metric, "mode": t.mode, "rows": rows, "best": best}, indent=2, default=str))
    # A trial stopped early (ASHA, a `stop` bound) has no export.
    ckpt = Path(best["export_dir"]) if best.get("export_dir") else None
    return TuneResult(rows, best_values, best[t.metric], best_spec, ckpt, table)


def _markdown(rows: list[dict], keys: list[str], metric: str) -> str:
    cols = ["trial", *keys, metric, "step", "reports", "status", "error"]
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"
