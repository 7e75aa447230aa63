"""The order in which training blocks are seen, streamed from the token cache.

Two levels, both seeded by ``run.seed``:

1. Shard order: the cache's parquet shards (one or more per source file, ≤16k blocks
   each) are read in a permutation of ``run.seed``, streamed by Ray Data and split across
   the Ray Train workers (``streaming_split``: each rank gets whole blocks in turn).
2. A local shuffle buffer of ``data.shuffle_buffer`` blocks in each rank's iterator,
   seeded by ``(run.seed, epoch, rank)``: every epoch sees another order.

Nothing here depends on timing, so the sequence of micro-batches each rank sees is a pure
function of the cache, the seed, the world size and the batch size. That is what makes a
resume exact: a restarted rank re-reads its epoch and drops the batches it already trained
on, and the next batch is the one an uninterrupted run would have taken.
"""

from __future__ import annotations

import numpy as np


def shard_order(files: list[str], seed: int) -> list[str]:
    """``files`` in the permutation of ``seed`` (the same on every machine)."""
    perm = np.random.default_rng(seed).permutation(len(files))
    return [files[i] for i in perm]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The local shuffle seed of one rank's epoch: distinct per (seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _as_int64(batch: dict) -> dict:
    # Stored as int32 (half the disk); the losses index with int64.
    return {"input_ids": np.stack(batch["input_ids"]).astype(np.int64)}


def read_blocks(files: list[str]):
    """A lazy Ray Dataset of ``input_ids`` blocks from cache shards, in ``files`` order.

    Reading and the cast fuse into one task per shard that asks for no CPU: a shard read
    is I/O, and on a machine whose CPUs the trainer's workers hold, a task that needs one
    would wait forever."""
    import ray.data

    ds = ray.data.read_parquet(files, num_cpus=0)
    return ds.map_batches(_as_int64, batch_format="numpy", num_cpus=0)
