"""The one training engine: every stage's DeepSpeed and Ray Train plumbing lives here.

A stage (pretrain, SFT, RM, DPO, task heads, the RL learner) brings its data, its loss and
its evaluation; this module owns everything about the distributed job around them:

- :func:`fit` builds the ``TorchTrainer`` (scaling, run identity, failure policy, collective
  timeout) and runs it under the stage's progress display; :func:`collect` copies the final
  checkpoint's Hugging Face export into the run dir and returns its final metrics.
- :func:`join_process_group` puts DeepSpeed on the group Ray Train created, with a bounded
  collective timeout.
- :func:`trainable` wraps a model in a DeepSpeed engine with AdamW and the LR schedule;
  :func:`frozen` places a model that is read every step but never trained (a reference
  policy, a reward model) like the trained one — sharded under ZeRO-3.
- :func:`gathered` makes parameters whole on every rank (the ZeRO-3 gather export and weight
  sync need); :func:`report_checkpoint` / :func:`report_final` are the one save → report →
  final-marker path.

``deepspeed.initialize`` is called in this module only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

from raystages import atomic

FINAL_MARKER = "final.json"  # in the last checkpoint: the run ended; its final metrics
EXPORT_SUBDIR = "hf"  # the final checkpoint's Hugging Face export

# How long a collective waits for a peer before failing. A *dead* worker is noticed by Ray
# Train within seconds; this bounds a *frozen* one (gloo's default is 30 minutes). It must
# outlast the longest stretch one rank spends alone — RL's controller generating a batch,
# scoring, evaluating — while the other ranks wait in the next collective.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


# -- driver side ------------------------------------------------------------------------


def fit(spec, loop: Callable[[dict], None], config: dict, label: str, total: int, datasets: dict | None = None):
    """Fit ``loop(config)`` on ``spec.scaling.num_workers`` Ray Train workers and return Ray
    Train's ``Result``. ``datasets`` (Ray Datasets by name) are split across the workers;
    ``label``/``total`` drive the progress display (steps, or RL iterations). Rerunning with
    the same ``run.storage_path``/``run.name`` resumes from the latest registered checkpoint
    (Train V2 resumes by run identity)."""
    from ray.train import DataConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raystages.resources import check_cluster
    from raystages.train.console import StageProgress
    from raystages.train.runner import run_config, scaling_config

    check_cluster(spec)
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"loop": loop, **config, "run_dir": str(spec.run_dir())},
        scaling_config=scaling_config(spec),
        torch_config=TorchConfig(timeout_s=int(COLLECTIVE_TIMEOUT.total_seconds())),
        run_config=run_config(spec),
        datasets=datasets or {},
        dataset_config=DataConfig(datasets_to_split="all"),
    )
    with StageProgress(label, spec.run_dir(), total):
        return trainer.fit()


def _worker_entry(config: dict) -> None:
    """First call on every Ray Train worker: output to the run's logs, then the stage's loop."""
    from raystages.train.runner import start_worker

    start_worker(config["run_dir"])
    config["loop"](config)


def collect(result, export_dir: Path, label: str) -> dict:
    """The final metrics of a fit, with its Hugging Face export copied to ``export_dir``."""
    if result.checkpoint is None:
        raise RuntimeError(f"{label}: training ended without a final checkpoint; see {export_dir.parent}")
    with result.checkpoint.as_directory() as d:
        copy_export(Path(d) / EXPORT_SUBDIR, export_dir)
        return json.loads((Path(d) / FINAL_MARKER).read_text())


def copy_export(src: Path, dst: Path) -> None:
    """Replace ``dst`` by a copy of ``src``; a crash mid-copy leaves ``dst`` as it was."""
    atomic.write_dir(lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True), dst)


# -- worker side: models ----------------------------------------------------------------


def join_process_group(device) -> None:
    """DeepSpeed on the group Ray Train created, with :data:`COLLECTIVE_TIMEOUT` on the groups
    DeepSpeed makes itself (they take torch's module default, not the world group's)."""
    import deepspeed
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = COLLECTIVE_TIMEOUT
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               timeout=COLLECTIVE_TIMEOUT, verbose=False)


def trainable(model, spec, optim=None):
    """``model`` as a DeepSpeed engine: AdamW, ZeRO as ``spec.deepspeed`` says, the LR
    schedule of ``optim`` (default ``spec.optim``; RL passes its own steps and rates).
    Only parameters that require grad are optimised (LoRA adapters, a new head)."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    from raystages.train.optim import deepspeed_config, lr_lambda

    optim = optim or spec.optim
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(spec, optim), lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda(optim)))
    return engine


def frozen(model, spec, device):
    """``model`` with gradients off, in eval mode, placed like the trained model.

    Under ZeRO-3 it is a DeepSpeed engine without an optimizer, its parameters partitioned
    over the ranks and gathered layer by layer in the forward pass (as OpenRLHF and
    DeepSpeed-Chat hold their reference models), so a model that only fits sharded still
    fits twice; every rank must then run the same forward calls. Under ZeRO 0-2 it is a
    plain copy per rank.
    """
    model.requires_grad_(False)
    model.eval()
    if spec.deepspeed.zero_stage != 3:
        return model.to(device)
    import deepspeed

    from raystages.train.optim import deepspeed_config

    engine, *_ = deepspeed.initialize(model=model, config=deepspeed_config(spec, trainable=False))
    engine.eval()
    return engine


def gathered(params, zero_stage: int):
    """Context in which ``params`` (a module's, or a list) are whole on every rank: ZeRO-3
    gathers them, other stages hold them whole already. Collective: every rank enters it."""
    if zero_stage != 3:
        return nullcontext()
    import deepspeed

    params = list(params.parameters() if hasattr(params, "parameters") else params)
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def return_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``; elsewhere nothing).

    glibc keeps what a step freed (activations, gathered parameters) in its arenas, so a
    rank's resident memory only ratchets up: without this the RL learner entered each update
    ~300 MB (1 rank) to 500 MB (2 ranks) above its live data (``raystages bench memory``).
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _load_libc()


# -- worker side: checkpoints -----------------------------------------------------------


def report_checkpoint(metrics: dict, write: Callable[[Path], None], upload: bool = True) -> None:
    """Collective. Every rank calls ``write(tmp)`` (its DeepSpeed shards, and on rank 0 any
    state and export) and reports ``tmp`` (only the ranks with ``upload``; the others report
    the metrics alone). Ray merges the ranks' dirs into one checkpoint and registers it only
    once all have reported, so a crash mid-save leaves the previous one as the latest."""
    import ray.train
    from ray.train import Checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="raystages-ckpt-"))
    try:
        write(tmp)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(tmp)) if upload else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def final_of(checkpoint) -> dict | None:
    """The final metrics recorded in ``checkpoint`` when it is a run's last one, else None."""
    with checkpoint.as_directory() as d:
        marker = Path(d) / FINAL_MARKER
        return json.loads(marker.read_text()) if marker.is_file() else None


def report_final(checkpoint, metrics: dict, rank: int) -> None:
    """Report an ended run's final ``checkpoint`` again (the driver died after the end, or
    the run is rerun): the driver gets its export back instead of training past the end."""
    import ray.train
    from ray.train import Checkpoint

    with checkpoint.as_directory() as d:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)
