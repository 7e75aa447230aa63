"""Driver side of a training stage: connect to Ray, fit a TorchTrainer, collect the export.

``run_training`` is what every Ray Train stage calls after preparing its datasets.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from raystages import __version__, atomic
from raystages.train.console import VERBOSE_ENV, capture_process_output, mark, take_driver_marks, verbose

EXPORT_DIR = "model"
# Progress bars from transformers/hub and Ray Data would bury the progress lines.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1",
             "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::FutureWarning"}
# Ray Train's controller polls its workers every 2 s by default, so each run waits up to a
# poll to see its workers start and again to see them finish: ~5 s of every run, measured with
# an empty train loop (15.8 s; 10.8 s at 0.5 s, 10.5 s at 0.25 s). Not lower: each poll is a
# call into every worker, and on 2 cores 0.25 s read 0-10% slower steps over 250 steps (noise
# or not). Propagated by Ray Train to its controller; a value the user set wins.
RAY_TRAIN_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


# Ray Train callbacks a caller wants on every trainer this context fits (Ray Tune's
# TuneReportCallback, from a trial): a stage's `run(spec)` then needs no callback argument.
_TRAINER_CALLBACKS: ContextVar[tuple] = ContextVar("raystages_trainer_callbacks", default=())


@contextmanager
def trainer_callbacks(callbacks: list):
    """Attach ``callbacks`` to every TorchTrainer that ``run_training`` fits inside the block."""
    token = _TRAINER_CALLBACKS.set((*_TRAINER_CALLBACKS.get(), *callbacks))
    try:
        yield
    finally:
        _TRAINER_CALLBACKS.reset(token)


def extra_callbacks() -> list:
    return list(_TRAINER_CALLBACKS.get())


@dataclass
class StageResult:
    stage: str
    run_dir: Path
    export_dir: Path
    metrics: dict = field(default_factory=dict)


def connect_ray() -> None:
    """Join ``RAY_ADDRESS`` if set, else an already-started session, else start a local one."""
    import logging

    import ray
    from ray.data import DataContext

    from raystages.train.console import verbose

    os.environ.update(QUIET_ENV)
    for name, value in RAY_TRAIN_POLL_ENV.items():
        os.environ.setdefault(name, value)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if not verbose():
        # Ray Data's executor runs in the driver; its resource warnings ("will hang unless
        # more CPUs are freed") describe a wait that the trainer's placement resolves.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        # A local cluster of our own: its token is set up for us; the notice is not news.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if not ray.is_initialized():
        # Workers' output (DeepSpeed, gloo, vLLM) goes to runs/<name>/logs unless verbose.
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=verbose(),
                 logging_level="WARNING", configure_logging=True)
    mark("ray")
    # Without it, even which rows each rank gets changes between runs.
    ctx.execution_options.preserve_order = True


def scaling_config(spec):
    """Ray Train's ScalingConfig from ``spec.scaling``: one worker per data-parallel rank."""
    from ray.train import ScalingConfig

    s = spec.scaling
    resources = {"CPU": s.cpus_per_worker} | ({"GPU": s.gpus_per_worker} if s.use_gpu else {})
    return ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources)


def run_config(spec):
    """Ray Train's RunConfig for a stage run: ``storage_path/name`` is the run dir, so a
    rerun of the same name resumes; ``run.keep_checkpoints`` kept, ``run.max_failures``
    group restarts, and the callbacks of any enclosing :func:`trainer_callbacks`."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    return RunConfig(
        name=spec.run.name, storage_path=str(spec.run_dir().parent),
        checkpoint_config=CheckpointConfig(num_to_keep=spec.run.keep_checkpoints),
        failure_config=FailureConfig(max_failures=spec.run.max_failures),
        logging_config=LoggingConfig(log_level="WARNING"),
        worker_runtime_env={"env_vars": QUIET_ENV | {VERBOSE_ENV: "1" if verbose() else "0"}},
        callbacks=extra_callbacks())


def startup_of_driver() -> dict:
    """The driver's start-up marks so far (the last: datasets ready, the trainer starts),
    for rank 0's report."""
    mark("datasets")
    return take_driver_marks()


def run_training(spec, stage, datasets: dict, tokenizer_dir: str) -> dict:
    """Fit ``stage`` on ``datasets`` (``train`` and ``val``) with the one engine and return
    the final metrics; the export lands in ``run_dir/model``."""
    from raystages.train import engine
    from raystages.train.worker import train_loop

    config = {"spec": spec, "stage": stage, "tokenizer_dir": tokenizer_dir, "startup": startup_of_driver()}
    result = engine.fit(spec, train_loop, config, stage.name, spec.optim.max_steps, datasets)
    return engine.collect(result, spec.run_dir() / EXPORT_DIR, stage.name)


def quiet_worker_logs() -> None:
    """Silence Train V2's per-report INFO line (a full metrics dict on every rank, every
    report). Its logger is named by file path, so ``LoggingConfig(log_level=...)`` misses it."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def start_worker(run_dir: str) -> None:
    """First call of every Ray Train worker: its output to ``run_dir/logs/worker-<rank>.log``."""
    import ray.train

    quiet_worker_logs()
    capture_process_output(run_dir, f"worker-{ray.train.get_context().get_world_rank()}")


def write_lineage(spec, export_dir: Path, metrics: dict, parent: str | None) -> dict:
    """``lineage.json`` in the export: stage, spec and hash, parent checkpoint, metrics, time.

    ``parent`` is resolved to the parent's own lineage when it has one, so the chain can be
    followed back to pretraining.
    """
    parent_lineage = None
    if parent and (Path(parent) / "lineage.json").is_file():
        parent_lineage = str((Path(parent) / "lineage.json").resolve())
    lineage = {
        "stage": spec.stage,
        "spec": spec.model_dump(mode="json"),
        "spec_hash": spec.digest(),
        "parent": str(Path(parent).resolve()) if parent and Path(parent).exists() else parent,
        "parent_lineage": parent_lineage,
        "metrics": metrics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "raystages_version": __version__,
    }
    atomic.write_text(export_dir / "lineage.json", json.dumps(lineage, indent=2, default=str))
    return lineage


def finish_stage(spec, export_dir: Path, metrics: dict, parent: str | None, skipped: list[str],
                 samples: list[dict] | None = None, extra: dict | None = None) -> StageResult:
    """The end of a stage run: ``lineage.json`` in the export, ``summary.json`` in the run dir
    (the first 20 skipped-row notes; the greedy samples, when the stage has some; the stage's
    ``extra`` keys), each written whole or not at all."""
    write_lineage(spec, export_dir, metrics, parent=parent)
    summary = {"stage": spec.stage, "export": str(export_dir), "parent": parent, "metrics": metrics,
               "skipped": skipped[:20]} | ({"samples": samples} if samples is not None else {}) | (extra or {})
    atomic.write_text(spec.run_dir() / "summary.json", json.dumps(summary, indent=2, default=str))
    return StageResult(spec.stage, spec.run_dir(), export_dir,
                       metrics | ({"samples": samples} if samples is not None else {}))


def save_run_spec(spec) -> None:
    run_dir = spec.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
