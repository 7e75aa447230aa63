"""The learner: what one Ray Train worker holds — one DeepSpeed data-parallel rank of the
policy and (PPO) the critic, plus the frozen reference policy and reward model — and the
collective calls between the ranks.

Every model goes through the one engine (:mod:`raystages.train.engine`): the policy and
critic are trainable engines, the reference policy and a same-tokenizer reward model are
frozen ones, so under ZeRO-3 all four are partitioned over the ranks and a rank's memory
for them shrinks as the group grows. A reward model that re-tokenises text
(``reward.retokenize``) is scored by the controller alone, so only rank 0 loads it.

The ranks are the workers of a ``TorchTrainer`` (:mod:`raystages.stages.rl` fits it) and all
run the RL loop of :mod:`raystages.rl.loop`, SPMD. Rank 0 is also the controller: it talks to
the rollout actors, scores and computes advantages, and hands each other rank its part with
:meth:`Learner.scatter`. Ray Train owns the process group and restarts the group from
its last reported checkpoint when a worker dies; DeepSpeed reuses that group.

Each rank receives only its own rows of a batch — a contiguous shard, scattered by the
controller (:meth:`Learner.scatter`) — forwards them in :meth:`Learner.compute` (the results
gathered on the controller alone, which scores and computes advantages for the whole batch)
and updates on them in :meth:`Learner.update`: each epoch a seeded permutation of its shard,
split into its share of every mini-batch, with one all-reduce of the mini-batches' token
counts so each step's gradient is the exact mean over the whole mini-batch.

Rows travel through the process group (``scatter_object_list`` / ``gather_object``), not the
object store: an ``ObjectRef`` handed from one Ray Train worker to another outside a Ray call
is serialised out of band, and Ray then pins its object for the owner's lifetime — one leaked
batch per iteration.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from raystages.rl.update import forward_batch, ppo_update
from raystages.train import engine


class ValueModel(torch.nn.Module):
    """Critic: a sequence-classification model's head applied at every position, ``(B, L)``."""

    def __init__(self, seq_model):
        super().__init__()
        self.seq = seq_model

    def forward(self, input_ids, attention_mask):
        from raystages.rl.rewards import token_values

        return token_values(self.seq, input_ids, attention_mask)


class Learner:
    """This rank's models and the collective calls of one RL iteration.

    ``rank``/``world`` are the Ray Train world rank and size; ``pids`` every rank's process
    id (for diagnostics and fault-injection tests). :mod:`raystages.rl.update` reads
    ``spec``, ``rank``, ``world``, ``device``, ``policy``, ``reference()``, ``critic`` and ``rm``.
    """

    def __init__(self, spec, rank: int, world: int, device: torch.device):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from raystages.models import with_lora
        from raystages.rl.rewards import RewardModelScorer, head_of

        self.spec, self.rank, self.world, self.device = spec, rank, world, device
        a = spec.algo
        torch.set_num_threads(max(1, math.ceil(spec.scaling.cpus_per_worker)))
        engine.join_process_group(device)
        self.pids = self.all_gather(os.getpid())
        torch.manual_seed(spec.run.seed)
        batch = a.prompts_per_iteration * a.group_size
        self.grad_accum = a.mini_batch_size // (world * spec.optim.micro_batch_size)
        steps = max(1, a.iterations * a.ppo_epochs * (batch // a.mini_batch_size))

        def optim(lr: float):
            return spec.optim.model_copy(update={"lr": lr, "grad_accum": self.grad_accum, "max_steps": steps})

        load = dict(use_safetensors=True, dtype=torch.float32, trust_remote_code=spec.model.trust_remote_code)
        policy = with_lora(AutoModelForCausalLM.from_pretrained(spec.model.path, **load), spec.lora, "CAUSAL_LM")
        self.policy = engine.trainable(policy, spec, optim(spec.optim.lr))
        # Read every step, never trained: placed like the policy (sharded under ZeRO-3). With
        # LoRA the reference is the policy's own frozen body, its adapters switched off.
        self.ref = None if spec.lora.enabled else engine.frozen(
            AutoModelForCausalLM.from_pretrained(spec.model.path, **load), spec, device)
        self.critic = None
        model_src = [s for s in spec.reward.sources if s.kind == "model"]
        if a.name == "ppo":
            path = {"policy": spec.model.path, "reward_model": model_src[0].ref if model_src else None}.get(
                spec.critic.init, spec.critic.init)
            seq = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **load)
            seq.config.pad_token_id = seq.config.pad_token_id or 0
            if spec.critic.init == "policy":
                torch.nn.init.zeros_(head_of(seq).weight)  # values start at 0, not noise
            if spec.lora.enabled:
                # Adapters injected in place (the value head trains whole): the critic reads
                # the model through its usual backbone and head, now with adapters.
                seq = with_lora(seq, spec.lora, "SEQ_CLS").get_base_model()
            self.critic = engine.trainable(ValueModel(seq), spec, optim(spec.critic.lr or spec.optim.lr))
        self.rm = None
        if model_src and not spec.reward.retokenize:
            # Scores the policy's own token ids in the forward pass every rank runs on its
            # shard: sharded like the policy.
            self.rm = RewardModelScorer(model_src[0].ref, False, spec.reward.normalize_model, device,
                                        place=lambda m: engine.frozen(m, spec, device))
        elif model_src and rank == 0:
            # Re-tokenised text is scored by the controller alone: only rank 0 holds it.
            self.rm = RewardModelScorer(model_src[0].ref, True, spec.reward.normalize_model, device)
        engine.return_free_memory()  # the whole copies each model was loaded as, before sharding

    # -- between ranks ---------------------------------------------------------------------

    def scatter(self, parts: list | None):
        """Rank 0's ``parts[r]`` on rank ``r`` (the other ranks pass None): each rank receives
        only its own part."""
        if self.world == 1:
            return parts[0]
        import torch.distributed as dist

        out = [None]
        dist.scatter_object_list(out, parts if self.rank == 0 else None, src=0)
        return out[0]

    def gather(self, obj) -> list | None:
        """Every rank's ``obj``, in rank order, on rank 0 (None on the others)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

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
        """Old/ref log-probs, entropy, values, RM scores ``(b, L-1)`` / ``(b,)`` of this rank's
        rows. Collective (ZeRO-3 gathers layers in every forward)."""
        return forward_batch(self, batch)

    def update(self, batch: dict, kl_coef: float, iteration: int) -> dict:
        """PPO epochs over seeded mini-batches; token-weighted means over all ranks."""
        return ppo_update(self, batch, kl_coef, iteration)

    @contextlib.contextmanager
    def reference(self):
        """The frozen reference policy: its own model, or (LoRA) the policy with its
        adapters switched off for the duration."""
        if self.ref is not None:
            yield self.ref
        else:
            with self.policy.module.disable_adapter():
                yield self.policy

    def score_texts(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Reward-model scores ``(B,)`` of re-tokenised text (``reward.retokenize``)."""
        return self.rm.score_texts(prompts, responses)

    # -- weights out -----------------------------------------------------------------------

    def gathered(self, params=None):
        """Context in which ``params`` (default: every policy parameter) are whole on every
        rank. Collective: every rank enters it."""
        return engine.gathered(self.policy.module if params is None else params, self.spec.deepspeed.zero_stage)

    def weight_buckets(self) -> list[list[tuple[str, torch.nn.Parameter, object]]]:
        """The policy's weights as the rollout engine loads them, ``(name, parameter, LoRA
        layer or None)`` (:func:`raystages.models.merged_weights_plan`; read one with
        :func:`raystages.models.merged_weight`), in sync buckets of about
        ``rollout.sync_bucket_mb`` (sized by full shapes: ZeRO-3 keeps them in ``ds_shape``);
        the same on every rank."""
        from raystages.models import merged_weights_plan
        from raystages.rl.sync import buckets

        named = merged_weights_plan(self.policy.module)
        sizes = [math.prod(getattr(p, "ds_shape", p.shape)) * p.element_size() for _, p, _ in named]
        limit = int(self.spec.rollout.sync_bucket_mb * 2**20)
        return [[named[i] for i in group] for group in buckets(sizes, limit)]

    def publish_weights(self) -> tuple[list | None, int, float]:
        """Collective. Bucket by bucket, every rank joins the gather and rank 0 puts the whole
        bucket in the object store (a copy into shared memory), released before the next.
        Returns ``(refs, bytes, extra_mb)`` on rank 0 (``(None, 0, 0.0)`` elsewhere): ``refs``
        is a plain list, so Ray passes the references on instead of resolving them;
        ``extra_mb`` is rank 0's largest growth of its own heap (resident anonymous memory)
        over its level before the sync, measured inside each bucket's gather, where the sync's
        peak is. The buckets' copies in the object store are not in it: that is the node's
        shared memory (``ray.put`` maps its pages into this process too, so they show in RSS),
        which holds the one published version until the next sync drops it."""
        import psutil
        import ray

        from raystages.rl.sync import bucket_payload

        def heap() -> int:
            m = psutil.Process().memory_info()
            return m.rss - getattr(m, "shared", 0)  # Linux: file-backed and shared pages

        base = heap() if self.rank == 0 else 0
        refs, nbytes, extra = [], 0, 0
        for named in self.weight_buckets():
            with self.gathered([p for _, p, _ in named]):
                if self.rank == 0:
                    tensors = bucket_payload(named)
                    nbytes += sum(t.numel() * t.element_size() for _, t in tensors)
                    refs.append(ray.put(tensors))
                    extra = max(extra, heap() - base)
                    del tensors
        return (refs, nbytes, extra / 2**20) if self.rank == 0 else (None, 0, 0.0)

    def peak_rss_mb(self) -> float:
        """The largest peak resident memory of any rank's process so far (VmHWM), in MiB.
        Collective."""
        import resource

        return max(self.all_gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))

    def weight_meta(self) -> dict:
        """Names, dtypes and full shapes of the weights the rollout engine loads (ZeRO-3 keeps
        ``ds_shape``; a LoRA-merged weight has its base weight's)."""
        from raystages.models import merged_weights_plan

        named = merged_weights_plan(self.policy.module)
        return {"names": [n for n, _, _ in named], "dtype_names": [str(p.dtype).removeprefix("torch.") for _, p, _ in named],
                "shapes": [list(getattr(p, "ds_shape", p.shape)) for _, p, _ in named]}

    def export(self, out_dir: str, tokenizer) -> None:
        """Rank 0 writes the policy as a Hugging Face checkpoint (LoRA merged into a copy; the
        training model keeps its adapters). Collective (ZeRO-3 gather)."""
        import copy

        from raystages.models import export_hf, without_adapters

        with self.gathered():
            if self.rank == 0:
                module = self.policy.module
                export_hf(without_adapters(copy.deepcopy(module)) if self.spec.lora.enabled else module,
                          tokenizer, out_dir)

    # -- checkpoints (every rank writes its own DeepSpeed shards) ---------------------------

    def save(self, ckpt_dir: str) -> None:
        self.policy.save_checkpoint(ckpt_dir, tag="policy")
        if self.critic is not None:
            self.critic.save_checkpoint(ckpt_dir, tag="critic")

    def load(self, ckpt_dir: str) -> None:
        self.policy.load_checkpoint(ckpt_dir, tag="policy")
        if self.critic is not None:
            self.critic.load_checkpoint(ckpt_dir, tag="critic")
