"""The per-worker training loop that every stage runs inside Ray Train.

DeepSpeed owns the model, optimizer step, gradient accumulation, clipping and LR schedule.
This loop owns the data position (so a restart resumes mid-epoch exactly), evaluation,
metrics, checkpoints and the final export. Every rank runs the same sequence of collective
calls (``ray.train.report``, DeepSpeed's all-reduces, evaluation all-reduce); the data is
split equally across ranks so no rank runs out first.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

from raystages.train import engine as ds

DS_TAG = "state"


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _epochs(shard, micro_batch_size: int, device, start_epoch: int, skip: int,
            shuffle_buffer: int = 0, seed: int = 0, rank: int = 0):
    """Micro-batches forever, epoch after epoch: ``(epoch, index_in_epoch, batch)``.

    Ray Data has no seek, so resuming mid-epoch re-reads and drops the first ``skip``
    batches of ``start_epoch`` (same world size and batch size as the interrupted run).
    With ``shuffle_buffer``, each epoch's local shuffle has its own seed, so the dropped
    batches are exactly those the interrupted run trained on.
    """
    from raystages.data.order import epoch_seed

    epoch = start_epoch
    while True:
        produced = False
        shuffle = ({"local_shuffle_buffer_size": shuffle_buffer,
                    "local_shuffle_seed": epoch_seed(seed, epoch, rank)} if shuffle_buffer else {})
        for i, batch in enumerate(shard.iter_torch_batches(
                batch_size=micro_batch_size, drop_last=True, device=device, **shuffle)):
            produced = True
            if epoch == start_epoch and i < skip:
                continue
            yield epoch, i, batch
        if not produced:
            raise RuntimeError("this worker's training shard yields no full micro-batch: "
                               "lower optim.micro_batch_size or scaling.num_workers, or add data")
        epoch += 1


def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from raystages.models import count_parameters, load_tokenizer
    from raystages.train.console import write_startup
    from raystages.train.metrics import MetricsLog, flops_per_token, peak_tflops, say

    spec, stage = config["spec"], config["stage"]
    run_dir = Path(config["run_dir"])
    startup_marks = [("workers", time.time())]  # this worker process is up
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, math.ceil(spec.scaling.cpus_per_worker)))
    _seed_everything(spec.run.seed)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint and (final := ds.final_of(checkpoint)) is not None:
        # The run already finished (the driver died after the end): hand the final
        # export back again instead of training past max_steps.
        ds.report_final(checkpoint, final, rank)
        return

    device = ray.train.torch.get_device() if spec.scaling.use_gpu else torch.device("cpu")
    ds.join_process_group(device)
    tokenizer = load_tokenizer(config["tokenizer_dir"], spec.model.trust_remote_code)
    model = stage.build_model(spec, tokenizer)
    n_params = count_parameters(model)
    engine = ds.trainable(model, spec)
    scheduler = engine.lr_scheduler
    stage.frozen = {name: ds.frozen(m, spec, engine.device)
                    for name, m in stage.build_frozen(spec, tokenizer).items()}
    startup_marks.append(("deepspeed", time.time()))  # trainable and frozen models initialised

    state = {"epoch": 0, "batches_in_epoch": 0, "items_seen": 0}
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client_state = engine.load_checkpoint(d, tag=DS_TAG)
            state = client_state["trainer_state"]
        if rank == 0:
            say(f"resumed at step {engine.global_steps} "
                f"(epoch {state['epoch']}, batch {state['batches_in_epoch']})")

    log = MetricsLog(run_dir, spec.optim.max_steps, spec.logging.tensorboard, stage.throughput_unit) if rank == 0 else None
    peak = peak_tflops(spec)
    model_config = getattr(engine.module, "config", None)
    flops_tok = flops_per_token(model_config, n_params, spec.optim.seq_len)
    val_batches = _first_batches(ray.train.get_dataset_shard("val"), spec.optim.micro_batch_size,
                                 engine.device, spec.run.eval_batches)
    startup_marks.append(("held-out data", time.time()))  # the held-out batches read

    def evaluate() -> dict:
        engine.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for batch in val_batches:
                loss, n = stage.loss(engine, batch)
                sums += torch.tensor([loss.item() * n, n], dtype=torch.float64)
            extra = stage.extra_eval(engine, val_batches)
        dist.all_reduce(sums)
        engine.train()
        val_loss = (sums[0] / sums[1].clamp(min=1)).item()
        out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
        return out | {f"val_{k}": v for k, v in _rank_mean(extra, world).items()}

    def save_checkpoint(metrics: dict) -> None:
        ds.report_checkpoint(metrics, lambda tmp: engine.save_checkpoint(
            str(tmp), tag=DS_TAG, client_state={"trainer_state": dict(state)}))

    start_step = engine.global_steps
    metrics: dict = {"step": start_step}
    window_loss, window_n, window_items, window_t = 0.0, 0, 0, time.time()
    window_extra: dict = {}  # the stage's train_metrics, summed over the window
    max_steps = spec.optim.max_steps
    engine.train()
    data = _epochs(ray.train.get_dataset_shard("train"), spec.optim.micro_batch_size,
                   engine.device, state["epoch"], state["batches_in_epoch"],
                   stage.shuffle_buffer, spec.run.seed, rank)
    pending: list = []  # the micro-batches of the current optimizer step, read ahead
    while engine.global_steps < max_steps:
        if not pending:
            pending = [next(data) for _ in range(spec.optim.grad_accum)]
            normalizer = _step_normalizer(stage, [b for _, _, b in pending], world)
        epoch, index, batch = pending.pop(0)
        loss, n_items = (stage.loss(engine, batch) if normalizer is None
                         else stage.loss(engine, batch, normalizer=normalizer))
        engine.backward(loss)
        before = engine.global_steps
        engine.step()
        state.update(epoch=epoch, batches_in_epoch=index + 1, items_seen=state["items_seen"] + n_items * world)
        window_loss += loss.item()
        for key, value in stage.train_metrics().items():
            window_extra[key] = window_extra.get(key, 0.0) + value
        window_n += 1
        window_items += n_items * world
        step = engine.global_steps
        if step == before:
            continue
        if rank == 0 and step == start_step + 1 and "startup" in config:
            write_startup(run_dir, config["startup"], [*startup_marks, ("first step", time.time())])
        on_log = step % spec.logging.log_every == 0 or step == max_steps
        on_eval = step % spec.run.eval_every == 0 or step == max_steps
        # The last step is checkpointed too: a crash during export then resumes at the end.
        on_ckpt = step % spec.run.checkpoint_every == 0 or step == max_steps
        if on_log:
            dt = time.time() - window_t
            throughput = window_items / dt
            metrics = {"step": step, "epoch": epoch, "loss": window_loss / window_n,
                       "lr": scheduler.get_last_lr()[0], "throughput": throughput,
                       "items_seen": state["items_seen"]}
            if stage.throughput_unit == "tok":
                metrics["tflops"] = throughput * flops_tok / 1e12
                if peak:
                    metrics["mfu"] = metrics["tflops"] / (peak * world)
            metrics.update(_rank_mean({k: float(v) / window_n for k, v in window_extra.items()}, world))
            window_loss, window_n, window_items, window_t = 0.0, 0, 0, time.time()
            window_extra = {}
        if on_eval:
            metrics.update(evaluate())
        if rank == 0 and (on_log or on_eval):
            log.log(step, metrics)
            log.progress(step, start_step, metrics)
        if on_ckpt:
            save_checkpoint(metrics)

    _export(engine, stage, tokenizer, spec, rank, {**metrics, "params": n_params, "start_step": start_step})
    if log:
        log.close()


def _step_normalizer(stage, batches: list, world: int) -> float | None:
    """For stages whose ``count`` says how many items (e.g. supervised tokens) each
    micro-batch holds: the divisor that makes the step's gradient the exact mean over all
    its items on all ranks. DeepSpeed divides each micro-batch loss by ``grad_accum`` and
    averages gradients over ranks, so each micro-batch divides its *sum* by
    ``total / (grad_accum * world)``. None: the stage's own per-micro-batch mean is used."""
    import torch
    import torch.distributed as dist

    counts = [stage.count(b) for b in batches]
    if counts[0] is None:
        return None
    total = torch.tensor([float(sum(counts))], dtype=torch.float64)
    dist.all_reduce(total)
    return max(total.item(), 1.0) / (len(batches) * world)


def _rank_mean(values: dict, world: int) -> dict[str, float]:
    """The mean over ranks of each of ``values`` (the same keys on every rank): one all-reduce."""
    import torch
    import torch.distributed as dist

    if not values:
        return {}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, (t / world).tolist()))


def _first_batches(shard, micro_batch_size: int, device, limit: int) -> list:
    """The first ``limit`` held-out micro-batches, read once and reused by every evaluation
    (iterating the whole shard keeps Ray Data's split coordinator in step across ranks)."""
    kept = []
    for batch in shard.iter_torch_batches(batch_size=micro_batch_size, device=device):
        if len(kept) < limit:
            kept.append(batch)
    return kept


def _export(engine, stage, tokenizer, spec, rank: int, metrics: dict) -> None:
    """Rank 0 writes the Hugging Face export into the final checkpoint, marked finished.
    Collective: under ZeRO-3 every rank joins the gather."""
    def write(tmp: Path) -> None:
        with ds.gathered(engine.module, spec.deepspeed.zero_stage):
            if rank == 0:
                stage.export(engine.module, tokenizer, str(tmp / ds.EXPORT_SUBDIR))
                (tmp / ds.FINAL_MARKER).write_text(json.dumps(metrics))

    # The final checkpoint is the export alone: rank 0 uploads it.
    ds.report_checkpoint(metrics, write, upload=rank == 0)
