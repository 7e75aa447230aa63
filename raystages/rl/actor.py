"""The rollout actor pool: N Ray actors, each holding one generation engine.

The controller hands the pool a list of prompts; the pool splits them into one contiguous
chunk per actor, runs the chunks in parallel and concatenates the results in order. A dead
actor (process killed, node lost) is replaced by a fresh one that loads the checkpoint and
then the latest synced weights (the pool keeps the object-store reference of the last
sync), and its chunk is retried — up to ``max_restarts`` replacements per run.

The RL stage builds the pool on the driver, which therefore owns the actors, and hands it
(pickled: actor handles travel) to learner rank 0, the controller. A learner group that Ray
Train restarts gets the driver's actors again; a replacement made by rank 0 belongs to its
worker and goes with it, and the new rank 0 replaces that actor afresh.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from raystages.rl.rollout import Generation, make_engine
from raystages.train.metrics import say

ACTOR_ERRORS = (RayActorError, ActorDiedError, ActorUnavailableError)


@ray.remote
class RolloutActor:
    """One engine in its own process. Weights arrive as an object-store reference."""

    def __init__(self, kind: str, checkpoint: str, engine_kwargs: dict):
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.engine = make_engine(kind, checkpoint, **engine_kwargs)

    def generate(self, prompt_ids, seeds, temperature, max_new_tokens) -> list[Generation]:
        return self.engine.generate(prompt_ids, seeds, temperature, max_new_tokens)

    def score(self, prompt_ids, response_ids) -> list[list[float]]:
        return self.engine.score(prompt_ids, response_ids)

    def update_weights(self, weights: list, version: int) -> int:
        # `weights` is a list of ObjectRefs, one per sync bucket: in a list, Ray passes the
        # references and this actor fetches the buckets itself, one at a time (zero-copy
        # from the node's object store when local).
        named = (pair for ref in weights for pair in ray.get(ref))
        self.engine.update_weights(named, version)
        return version

    def version(self) -> int:
        return self.engine.version()

    def call_engine(self, method: str, *args):
        """Engine-specific calls (the GPU NCCL sync: ``init_nccl``, ``receive_nccl``)."""
        return getattr(self.engine, method)(*args)

    def pid(self) -> int:
        return os.getpid()


@dataclass
class Pending:
    """Chunks in flight: ``[actor index, actor handle, prompts, seeds, future]``."""

    chunks: list
    temperature: float
    max_new_tokens: int


class RolloutPool:
    def __init__(self, kind: str, checkpoint: str, num_actors: int, engine_kwargs: dict | None = None,
                 cpus: float = 1.0, gpus: float = 0.0, max_restarts: int = 3):
        self.kind, self.checkpoint = kind, checkpoint
        self.engine_kwargs = engine_kwargs or {}
        self.options = {"num_cpus": cpus, "num_gpus": gpus, "max_concurrency": 1,
                        "runtime_env": {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                                     "TOKENIZERS_PARALLELISM": "false",
                                                     "OMP_NUM_THREADS": str(max(1, int(cpus)))}}}
        self.max_restarts = max_restarts
        self.restarts = 0
        self.weights_ref = None  # the last sync's bucket refs; replacements load them
        self.weights_version = 0
        self.actors = [self._spawn() for _ in range(num_actors)]
        ray.get([a.version.remote() for a in self.actors])  # fail fast if an engine cannot start

    def _spawn(self):
        return RolloutActor.options(**self.options).remote(self.kind, self.checkpoint, self.engine_kwargs)

    def _replace(self, i: int, error: Exception) -> None:
        if self.restarts >= self.max_restarts:
            raise RuntimeError(f"rollout actor {i} died and rollout.max_restarts={self.max_restarts} "
                               f"replacements are used up: {error}") from error
        self.restarts += 1
        say(f"rollout actor {i} died ({type(error).__name__}); replacing it "
            f"({self.restarts}/{self.max_restarts}) and retrying its work")
        ray.kill(self.actors[i])  # in case it is unreachable rather than dead
        actor = self._spawn()
        if self.weights_ref is not None:
            ray.get(actor.update_weights.remote(self.weights_ref, self.weights_version))
        self.actors[i] = actor

    def submit(self, prompt_ids: list[list[int]], seeds: list[int], temperature: float,
               max_new_tokens: int) -> Pending:
        """Start generating (returns at once); :meth:`collect` waits for the results."""
        n = len(self.actors)
        size = -(-len(prompt_ids) // n)
        chunks = []
        for i in range(n):
            lo, hi = i * size, min((i + 1) * size, len(prompt_ids))
            if lo < hi:
                fut = self.actors[i].generate.remote(prompt_ids[lo:hi], seeds[lo:hi], temperature, max_new_tokens)
                chunks.append([i, self.actors[i], prompt_ids[lo:hi], seeds[lo:hi], fut])
        return Pending(chunks, temperature, max_new_tokens)

    def collect(self, pending: Pending) -> list[Generation]:
        out: list[Generation] = []
        for chunk in pending.chunks:
            i, actor, prompts, seeds, fut = chunk
            while True:
                try:
                    out.extend(ray.get(fut))
                    break
                except ACTOR_ERRORS as e:
                    if self.actors[i] is actor:  # not already replaced by a weight sync
                        self._replace(i, e)
                    actor = self.actors[i]
                    fut = actor.generate.remote(prompts, seeds, pending.temperature, pending.max_new_tokens)
        return out

    def generate(self, prompt_ids, seeds, temperature, max_new_tokens) -> list[Generation]:
        return self.collect(self.submit(prompt_ids, seeds, temperature, max_new_tokens))

    def drop_weights(self) -> None:
        """Release the last sync's buckets (a new version is about to be put): a replacement
        spawned before the next :meth:`update_weights` starts from the checkpoint, and that
        call then loads the new version into it like every other actor."""
        self.weights_ref = None

    def update_weights(self, weights_ref: list, version: int) -> None:
        """Every actor loads the weights behind ``weights_ref`` (the sync's bucket refs) as ``version``."""
        self.weights_ref, self.weights_version = weights_ref, version
        futures = [a.update_weights.remote(weights_ref, version) for a in self.actors]
        for i, fut in enumerate(futures):
            try:
                ray.get(fut)
            except ACTOR_ERRORS as e:
                self._replace(i, e)  # the replacement loads weights_ref itself

    def versions(self) -> list[int]:
        return ray.get([a.version.remote() for a in self.actors])

    def score(self, prompt_ids, response_ids) -> list[list[float]]:
        return ray.get(self.actors[0].score.remote(prompt_ids, response_ids))

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
