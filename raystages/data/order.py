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


def _read_shards(batch: dict):
    """Ray Data ``map_batches`` generator: shard paths in, their blocks out as ``int64``
    (stored as int32: half the disk; the losses index with int64), a row group at a time."""
    import pyarrow.parquet as pq

    for path in batch["path"]:
        for group in pq.ParquetFile(str(path)).iter_batches():
            yield {"input_ids": np.stack(group.column("input_ids").to_numpy(zero_copy_only=False)).astype(np.int64)}


# Reader tasks at once. Asking for no CPU, nothing else would cap them: Ray Data would
# start one worker process per shard at the first batch (45 for a 200 MB corpus: ~40 s
# before the first step and gigabytes of RSS, measured by `raystages bench data`). Two
# readers outpace training by orders of magnitude.
READERS = 2


def read_blocks(files: list[str]):
    """A lazy Ray Dataset of ``input_ids`` blocks from cache shards, in ``files`` order.

    Our own reader over the list of shards rather than ``read_parquet``: its tasks ask for
    no CPU. A shard read is I/O, and while the trainer's workers hold every CPU of the
    cluster (2 workers on 2 CPUs), a task that needs one — ``read_parquet`` lists files in
    such a task first — waits forever and so does training."""
    import ray.data

    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    return ds.map_batches(_read_shards, batch_size=1, batch_format="numpy", num_cpus=0,
                          concurrency=max(1, min(READERS, len(files))))
