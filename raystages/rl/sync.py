"""Versioned weight sync, learner -> every rollout actor, after each update.

CPU (and the default everywhere): learner rank 0 gathers the policy's parameters (under
ZeRO-3 every rank joins ``GatheredParameters`` first), copies them to CPU and ``ray.put``s
them once; every actor fetches that one object from the object store (zero-copy from shared
memory on the same node) and loads it in place (:meth:`Engine.update_weights`). The version
number travels with the weights; each generation reports the version it used, so the
controller can check that rollouts are on-policy.

GPU (``if torch.cuda.is_available()`` and vLLM engines): an NCCL group of learner rank 0 +
one vLLM worker per actor, through vLLM's weight-transfer API (``weight_transfer_config``
with the ``nccl`` backend; ``init_weight_transfer_engine`` / ``start_weight_update`` /
``update_weights`` / ``finish_weight_update`` on the workers) while rank 0 broadcasts each
tensor. Written against vLLM 0.32's API; CI here has no GPU, so the CPU path is the tested one.
"""

from __future__ import annotations

import time

import ray
import torch


class WeightSync:
    """Controller side: ``sync()`` bumps the version and pushes the learner's weights."""

    def __init__(self, learner, pool, use_nccl: bool | None = None):
        self.learner, self.pool = learner, pool
        self.version = 0
        self.use_nccl = (torch.cuda.is_available() and pool.kind == "vllm") if use_nccl is None else use_nccl
        self._nccl_init = None
        if self.use_nccl:
            self._nccl_init = _nccl_setup(learner, pool)
            # A replacement actor would not be in the NCCL group: fail loudly instead of
            # hanging in the next broadcast.
            pool.max_restarts = 0

    def sync(self) -> dict:
        self.version += 1
        t0 = time.perf_counter()
        if self.use_nccl:
            nbytes = _nccl_sync(self.learner, self.pool, self._nccl_init, self.version)
            t_pub = 0.0
        else:
            ref, nbytes = self.learner.publish_weights()
            t_pub = time.perf_counter() - t0
            self.pool.update_weights(ref, self.version)
        dt = time.perf_counter() - t0
        return {"version": self.version, "sync_s": dt, "sync_publish_s": t_pub, "sync_bytes": nbytes,
                "sync_bytes_per_s": nbytes / max(dt, 1e-9)}


def memcpy_bytes_per_s(nbytes: int, repeats: int = 5) -> float:
    """Baseline for the bench: a plain in-process copy of ``nbytes`` (best of ``repeats``)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return src.numel() * 4 / best


# -- GPU path: NCCL through vLLM's weight-transfer API ---------------------------------------

def _nccl_setup(learner, pool) -> dict:
    host, port = ray.get(learner.workers[0].address.remote())
    world = 1 + len(pool.actors)
    futures = [a.call_engine.remote("init_nccl", {"master_address": host, "master_port": port,
                                                  "rank_offset": 1 + i, "world_size": world})
               for i, a in enumerate(pool.actors)]
    init = {"master_address": host, "master_port": port, "world_size": world}
    ray.get([learner.workers[0].nccl_broadcast.remote(init, 0)] + futures)
    return init


def _nccl_sync(learner, pool, init: dict, version: int) -> int:
    meta = ray.get(learner.workers[0].weight_meta.remote())
    receivers = [a.call_engine.remote("receive_nccl", meta, version) for a in pool.actors]
    senders = [w.nccl_broadcast.remote(None, version) for w in learner.workers]
    nbytes = ray.get(senders)[0]
    ray.get(receivers)
    return nbytes


def nccl_send(worker, init: dict | None, named_params) -> int:
    """On learner rank 0: join the group (first call, ``init`` given) or broadcast every tensor."""
    if init is not None:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        worker._nccl = trainer_init(init)
        return 0
    nbytes = 0
    for _, p in named_params:
        t = p.detach().contiguous()
        worker._nccl.broadcast(t, src=0, stream=torch.cuda.current_stream())
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
