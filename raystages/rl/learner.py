"""The learner: what one Ray Train worker holds — one DeepSpeed data-parallel rank of the
policy and (PPO) the critic, plus the frozen reference policy and reward model — and the
collective calls between the ranks.

The ranks are the workers of a ``TorchTrainer`` (:mod:`raystages.stages.rl` fits it) and all
run the RL loop of :mod:`raystages.rl.loop`, SPMD. Rank 0 is also the controller: it talks to
the rollout actors, scores and computes advantages, and hands its results to the other ranks
with :meth:`Learner.broadcast`. Ray Train owns the process group and restarts the group from
its last reported checkpoint when a worker dies; DeepSpeed reuses that group.

Every rank holds the whole batch and works on its own rows: contiguous shards in
:meth:`Learner.compute` (gathered back on every rank), a seeded permutation split into
mini-batches in :meth:`Learner.update`, so all ranks agree on the plan without talking.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from datetime import timedelta
from types import SimpleNamespace

import torch

from raystages.rl.update import forward_batch, ppo_update

# How long a collective waits for a peer before failing. A *dead* worker is noticed by Ray
# Train within seconds; this bounds a *frozen* one (gloo's default is 30 minutes). It must
# outlast the longest stretch rank 0 spends alone — generating a batch, scoring, evaluating —
# while the other ranks wait in the next broadcast.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


class ValueModel(torch.nn.Module):
    """Critic: a sequence-classification model's head applied at every position, ``(B, L)``."""

    def __init__(self, seq_model):
        super().__init__()
        self.seq = seq_model

    def forward(self, input_ids, attention_mask):
        from raystages.rl.rewards import token_values

        return token_values(self.seq, input_ids, attention_mask)


def _deepspeed(model, spec, lr: float, grad_accum: int, total_steps: int):
    """``deepspeed.initialize`` with the stage's config and LR schedule (warmup, decay over
    the run's ``total_steps`` optimizer steps) at learning rate ``lr``."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    from raystages.train.optim import deepspeed_config, lr_lambda

    optim = spec.optim.model_copy(update={"lr": lr, "grad_accum": grad_accum, "max_steps": max(1, total_steps)})
    config = deepspeed_config(SimpleNamespace(optim=optim, deepspeed=spec.deepspeed, scaling=spec.scaling))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                      lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda(optim)))
    return engine


def _join_process_group(device: torch.device) -> None:
    """DeepSpeed on the group Ray Train created, with :data:`COLLECTIVE_TIMEOUT` on the groups
    DeepSpeed makes itself (they take torch's module default, not the world group's)."""
    import deepspeed
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = COLLECTIVE_TIMEOUT
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               timeout=COLLECTIVE_TIMEOUT, verbose=False)


class Learner:
    """This rank's models and the collective calls of one RL iteration.

    ``rank``/``world`` are the Ray Train world rank and size; ``pids`` every rank's process
    id (for diagnostics and fault-injection tests). :mod:`raystages.rl.update` reads
    ``spec``, ``rank``, ``world``, ``device``, ``policy``, ``ref``, ``critic`` and ``rm``.
    """

    def __init__(self, spec, rank: int, world: int, device: torch.device):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from raystages.rl.rewards import RewardModelScorer, head_of

        self.spec, self.rank, self.world, self.device = spec, rank, world, device
        a = spec.algo
        torch.set_num_threads(max(1, math.ceil(spec.scaling.cpus_per_worker)))
        _join_process_group(device)
        self.pids = self.all_gather(os.getpid())
        torch.manual_seed(spec.run.seed)
        batch = a.prompts_per_iteration * a.group_size
        self.grad_accum = a.mini_batch_size // (world * spec.optim.micro_batch_size)
        steps = a.iterations * a.ppo_epochs * (batch // a.mini_batch_size)
        load = dict(use_safetensors=True, dtype=torch.float32, trust_remote_code=spec.model.trust_remote_code)
        policy = AutoModelForCausalLM.from_pretrained(spec.model.path, **load)
        self.policy = _deepspeed(policy, spec, spec.optim.lr, self.grad_accum, steps)
        self.ref = AutoModelForCausalLM.from_pretrained(spec.model.path, **load).to(device).eval()
        self.ref.requires_grad_(False)
        self.critic = None
        model_src = [s for s in spec.reward.sources if s.kind == "model"]
        if a.name == "ppo":
            path = {"policy": spec.model.path, "reward_model": model_src[0].ref if model_src else None}.get(
                spec.critic.init, spec.critic.init)
            seq = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **load)
            seq.config.pad_token_id = seq.config.pad_token_id or 0
            if spec.critic.init == "policy":
                torch.nn.init.zeros_(head_of(seq).weight)  # values start at 0, not noise
            self.critic = _deepspeed(ValueModel(seq), spec, spec.critic.lr or spec.optim.lr, self.grad_accum, steps)
        self.rm = None
        if model_src:
            self.rm = RewardModelScorer(model_src[0].ref, spec.reward.retokenize, spec.reward.normalize_model, device)

    # -- between ranks ---------------------------------------------------------------------

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (the others pass None). For the small CPU
        tensors and dicts the controller hands out: pickled, one collective."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    # -- one iteration ---------------------------------------------------------------------

    def compute(self, batch: dict) -> dict:
        """Old/ref log-probs, entropy, values, RM scores ``(B, L-1)`` / ``(B,)`` for the whole
        batch: each rank forwards its contiguous shard, every rank gets all of them."""
        parts = self.all_gather(forward_batch(self, batch))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def update(self, batch: dict, kl_coef: float, iteration: int) -> dict:
        """PPO epochs over seeded mini-batches; token-weighted means over all ranks."""
        return ppo_update(self, batch, kl_coef, iteration)

    def score_texts(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Reward-model scores ``(B,)`` of re-tokenised text (``reward.retokenize``)."""
        return self.rm.score_texts(prompts, responses)

    # -- weights out -----------------------------------------------------------------------

    def gathered(self):
        """Context in which every parameter is whole on every rank (ZeRO-3 gathers; others
        no-op). Collective: every rank enters it."""
        if self.spec.deepspeed.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.policy.module.parameters()), modifier_rank=None)
        return nullcontext()

    def publish_weights(self) -> tuple[list | None, int]:
        """Every rank joins the gather; rank 0 puts the weights in the object store and
        returns ``([ref], bytes)`` (the list keeps Ray from resolving the ref when passed)."""
        import ray

        with self.gathered():
            if self.rank != 0:
                return None, 0
            named = [(n, p.detach().to("cpu", copy=True)) for n, p in self.policy.module.named_parameters()]
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        return [ray.put(named)], nbytes

    def weight_meta(self) -> dict:
        """Names, dtypes and full shapes of the policy's parameters (ZeRO-3 keeps ``ds_shape``)."""
        named = list(self.policy.module.named_parameters())
        return {"names": [n for n, _ in named], "dtype_names": [str(p.dtype).removeprefix("torch.") for _, p in named],
                "shapes": [list(getattr(p, "ds_shape", p.shape)) for _, p in named]}

    def export(self, out_dir: str, tokenizer) -> None:
        """Rank 0 writes the policy as a Hugging Face checkpoint. Collective (ZeRO-3 gather)."""
        from raystages.models import export_hf

        with self.gathered():
            if self.rank == 0:
                export_hf(self.policy.module, tokenizer, out_dir)

    # -- checkpoints (every rank writes its own DeepSpeed shards) ---------------------------

    def save(self, ckpt_dir: str) -> None:
        self.policy.save_checkpoint(ckpt_dir, tag="policy")
        if self.critic is not None:
            self.critic.save_checkpoint(ckpt_dir, tag="critic")

    def load(self, ckpt_dir: str) -> None:
        self.policy.load_checkpoint(ckpt_dir, tag="policy")
        if self.critic is not None:
            self.critic.load_checkpoint(ckpt_dir, tag="critic")
