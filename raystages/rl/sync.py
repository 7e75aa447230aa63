"""Versioned weight sync, learner -> every rollout actor, after each update.

Every learner rank holds a :class:`WeightSync` and calls ``sync()`` at the same point of the
loop: under ZeRO-3 every rank must join the parameter gather; rank 0 (the controller, the only
rank that holds the rollout pool) then ships the weights.

CPU (and the default everywhere): the policy's parameters go in buckets of about
``rollout.sync_bucket_mb`` (:func:`buckets`): every rank joins the gather of one bucket (ZeRO-3),
rank 0 ``ray.put``s it and the gather is released before the next, so the learner holds about
one whole bucket beyond its shards, never the whole model. Every actor fetches the buckets from
the object store (zero-copy from shared memory on the same node) one at a time and loads them
in place (:meth:`Engine.update_weights`).
The version number travels with the weights; each generation reports the version it used, so
the controller can check that rollouts are on-policy.

GPU (``if torch.cuda.is_available()`` and vLLM engines): an NCCL group of learner rank 0 (in
its Ray Train worker) + one vLLM worker per actor, through vLLM's weight-transfer API
(``weight_transfer_config`` with the ``nccl`` backend; ``init_weight_transfer_engine`` /
``start_weight_update`` / ``update_weights`` / ``finish_weight_update`` on the workers) while
rank 0 broadcasts each tensor. A restarted learner group opens a new group (untested). Written
against vLLM 0.32's API; CI here has no GPU, so the CPU path is the tested one.
"""

from __future__ import annotations

import socket
import time

import ray
import torch


class WeightSync:
    """``sync()`` bumps the version and pushes the learner's weights; ``push(version)``
    pushes them under a given version (a restored checkpoint's). Collective: every rank
    calls both; ``pool`` is the rollout pool on rank 0 and None elsewhere."""

    def __init__(self, learner, pool, use_nccl: bool | None = None):
        self.learner, self.pool = learner, pool
        self.version = 0
        # Decided from the spec, not the pool, so that every rank agrees.
        if use_nccl is None:
            use_nccl = torch.cuda.is_available() and learner.spec.rollout_engine() == "vllm"
        self.use_nccl = use_nccl
        self._nccl_init = None
        if self.use_nccl and pool is not None:
            self._nccl_init = _nccl_setup(learner, pool)
            # A replacement actor would not be in the NCCL group: fail loudly instead of
            # hanging in the next broadcast.
            pool.max_restarts = 0

    def sync(self) -> dict:
        return self.push(self.version + 1)

    def push(self, version: int) -> dict:
        self.version = version
        t0 = time.perf_counter()
        t_pub = 0.0
        extra = {}
        if self.use_nccl:
            nbytes = _nccl_sync(self.learner, self.pool, version)
        else:
            if self.pool is not None:
                self.pool.drop_weights()  # so the object store holds one version, not two
            refs, nbytes, extra_mb = self.learner.publish_weights()
            extra = {"sync_extra_peak_mb": extra_mb}
            t_pub = time.perf_counter() - t0
            if self.pool is not None:
                self.pool.update_weights(refs, version)
        dt = time.perf_counter() - t0
        return {"version": version, "sync_s": dt, "sync_publish_s": t_pub, "sync_bytes": nbytes,
                "sync_bytes_per_s": nbytes / max(dt, 1e-9)} | extra


def buckets(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive indices of ``sizes`` (bytes per tensor) grouped so that each group's total
    is at most ``limit``; a tensor larger than ``limit`` is a group of its own. Order kept.

    >>> buckets([4, 4, 4, 10, 1], 8)
    [[0, 1], [2], [3], [4]]
    """
    out: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if out and total + size <= limit:
            out[-1].append(i)
            total += size
        else:
            out.append([i])
            total = size
    return out


def bucket_payload(named) -> list[tuple[str, torch.Tensor]]:
    """One gathered bucket (``(name, parameter, LoRA layer or None)``) as rank 0 puts it in the
    object store: each weight merged, on the CPU, and a copy with a storage of its own.
    DeepSpeed keeps parameters as views into flat buffers, and a pickled view carries its
    whole storage: without the copy every tensor of every bucket would ship the whole model."""
    from raystages.models import merged_weight

    return [(name, merged_weight(p, layer).to("cpu", copy=True)) for name, p, layer in named]


def memcpy_bytes_per_s(nbytes: int, repeats: int = 20) -> float:
    """Baseline for the bench: a plain in-process copy of ``nbytes`` (best of ``repeats``)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.zeros_like(src)  # touched, so no copy pays first-touch page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return src.numel() * 4 / best


# -- GPU path: NCCL through vLLM's weight-transfer API ---------------------------------------

def _free_address() -> tuple[str, int]:
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def _nccl_setup(learner, pool) -> dict:
    """On rank 0: open the NCCL group of rank 0 + every actor's vLLM worker."""
    host, port = _free_address()
    world = 1 + len(pool.actors)
    futures = [a.call_engine.remote("init_nccl", {"master_address": host, "master_port": port,
                                                  "rank_offset": 1 + i, "world_size": world})
               for i, a in enumerate(pool.actors)]
    init = {"master_address": host, "master_port": port, "world_size": world}
    nccl_send(learner, init, [])  # returns once the actors have joined
    ray.get(futures)
    return init


def _nccl_sync(learner, pool, version: int) -> int:
    """Every rank joins the gather; rank 0 broadcasts each tensor to the actors."""
    receivers = []
    if pool is not None:
        meta = learner.weight_meta()
        receivers = [a.call_engine.remote("receive_nccl", meta, version) for a in pool.actors]
    nbytes = 0
    for named in learner.weight_buckets():
        with learner.gathered([p for _, p, _ in named]):
            if learner.rank == 0:
                nbytes += nccl_send(learner, None, named)
    ray.get(receivers)
    return nbytes


def nccl_send(learner, init: dict | None, named_params) -> int:
    """On learner rank 0: join the group (first call, ``init`` given) or broadcast every
    weight of a bucket (``(name, parameter, LoRA layer or None)``, merged as it goes)."""
    if init is not None:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        learner._nccl = trainer_init(init)
        return 0
    from raystages.models import merged_weight

    nbytes = 0
    for _, p, layer in named_params:
        t = merged_weight(p, layer).contiguous()
        learner._nccl.broadcast(t, src=0, stream=torch.cuda.current_stream())
        nbytes += t.numel() * t.element_size()
    torch.cuda.synchronize()
    return nbytes


def vllm_init_nccl(llm, info: dict) -> None:
    """On a rollout actor (vLLM built with ``weight_transfer_config={"backend": "nccl"}``)."""
    llm.collective_rpc("init_weight_transfer_engine", args=({**info, "packed": False},))


def vllm_receive_nccl(llm, meta: dict) -> None:
    llm.collective_rpc("start_weight_update")
    llm.collective_rpc("update_weights", args=(meta,))
    llm.collective_rpc("finish_weight_update")
    llm.reset_prefix_cache()
