"""The learner: a group of Ray actors, each one data-parallel rank holding the policy and
(PPO) the critic under DeepSpeed, plus the frozen reference policy and reward model.

Why actors that set up ``torch.distributed`` + DeepSpeed themselves rather than a Ray Train
``TorchTrainer``: a trainer owns the control flow — it runs one function to completion —
while the RL controller must interleave learner calls with rollouts, scoring and weight
syncs, iteration after iteration. Long-lived actors called once per phase (``compute``,
``update``, ``publish_weights``) keep that dataflow in the controller as plain calls, as
verl's worker groups and OpenRLHF's actor groups do. What Ray Train would add is restart on
failure; the controller gets it by saving the learner's DeepSpeed state every
``run.checkpoint_every`` iterations and resuming a rerun (same run name) from it.

Every rank receives the whole batch (one object in the store) and works on its own rows:
contiguous shards in ``compute``, a seeded permutation split into mini-batches in
``update``, so all ranks agree on the plan without talking.
"""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta
from types import SimpleNamespace

import ray
import torch

from raystages.rl.update import forward_batch, ppo_update
from raystages.train.runner import QUIET_ENV


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


def _setup(w, master: tuple[str, int]) -> None:
    """Join the process group and build policy, reference, critic and reward model.

    A module-level function, not an actor method: Ray pickles actor classes by value, and
    cloudpickle would then drag in torch config objects that cannot be pickled.
    """
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from raystages.rl.rewards import RewardModelScorer, head_of

    spec, a = w.spec, w.spec.algo
    os.environ.update({"MASTER_ADDR": master[0], "MASTER_PORT": str(master[1]), "RANK": str(w.rank),
                       "WORLD_SIZE": str(w.world), "LOCAL_RANK": "0"})
    backend = "nccl" if w.device.type == "cuda" else "gloo"
    # A short timeout: a dead peer should fail the call in minutes, not gloo's 30.
    dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=w.rank,
                            world_size=w.world, timeout=timedelta(minutes=5))
    deepspeed.init_distributed(dist_backend=backend)
    torch.manual_seed(spec.run.seed)
    batch = a.prompts_per_iteration * a.group_size
    w.grad_accum = a.mini_batch_size // (w.world * spec.optim.micro_batch_size)
    steps = spec.algo.iterations * a.ppo_epochs * (batch // a.mini_batch_size)
    load = dict(use_safetensors=True, dtype=torch.float32, trust_remote_code=spec.model.trust_remote_code)
    policy = AutoModelForCausalLM.from_pretrained(spec.model.path, **load)
    w.policy = _deepspeed(policy, spec, spec.optim.lr, w.grad_accum, steps)
    w.ref = AutoModelForCausalLM.from_pretrained(spec.model.path, **load).to(w.device).eval()
    w.ref.requires_grad_(False)
    w.critic = None
    if a.name == "ppo":
        rm = next((s.ref for s in spec.reward.sources if s.kind == "model"), None)
        path = {"policy": spec.model.path, "reward_model": rm}.get(spec.critic.init, spec.critic.init)
        seq = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **load)
        seq.config.pad_token_id = seq.config.pad_token_id or 0
        if spec.critic.init == "policy":
            torch.nn.init.zeros_(head_of(seq).weight)  # values start at 0, not noise
        critic = ValueModel(seq)
        w.critic = _deepspeed(critic, spec, spec.critic.lr or spec.optim.lr, w.grad_accum, steps)
    w.rm = None
    model_src = [s for s in spec.reward.sources if s.kind == "model"]
    if model_src:
        w.rm = RewardModelScorer(model_src[0].ref, spec.reward.retokenize, spec.reward.normalize_model, w.device)


@ray.remote
class LearnerWorker:
    def __init__(self, spec, rank: int, world: int):
        self.spec, self.rank, self.world = spec, rank, world
        torch.set_num_threads(max(1, math.ceil(spec.scaling.cpus_per_worker)))
        self.device = torch.device("cuda" if spec.scaling.use_gpu and torch.cuda.is_available() else "cpu")

    def address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(self, master: tuple[str, int]) -> int:
        _setup(self, master)
        return self.rank

    def compute(self, batch: dict) -> dict:
        """For this rank's contiguous shard: old/ref log-probs, entropy, values, RM scores."""
        return forward_batch(self, batch)

    def score_texts(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return self.rm.score_texts(prompts, responses)

    def update(self, batch: dict, kl_coef: float, iteration: int) -> dict:
        """PPO epochs over seeded mini-batches; token-weighted means over all ranks."""
        return ppo_update(self, batch, kl_coef, iteration)

    # -- weights out -----------------------------------------------------------------------

    def _gathered(self):
        """Context in which every parameter is whole on every rank (ZeRO-3 gathers; others no-op)."""
        from contextlib import nullcontext

        import deepspeed

        if self.spec.deepspeed.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(self.policy.module.parameters()), modifier_rank=None)
        return nullcontext()

    def publish_weights(self) -> tuple[list | None, int]:
        """Every rank joins the gather; rank 0 puts the weights in the object store and
        returns ``([ref], bytes)`` (the list keeps Ray from resolving the ref on return)."""
        with self._gathered():
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

    def nccl_broadcast(self, init: dict | None, version: int) -> int:
        """GPU sync: join the NCCL group (``init`` given, rank 0 only) or broadcast the weights."""
        from raystages.rl.sync import nccl_send

        if init is not None:
            return nccl_send(self, init, [])
        with self._gathered():
            if self.rank == 0:
                return nccl_send(self, None, list(self.policy.module.named_parameters()))
        return 0

    def export(self, out_dir: str, tokenizer_dir: str) -> str | None:
        from raystages.models import export_hf, load_tokenizer

        with self._gathered():
            if self.rank == 0:
                export_hf(self.policy.module, load_tokenizer(tokenizer_dir), out_dir)
                return out_dir
        return None

    def save(self, ckpt_dir: str) -> None:
        self.policy.save_checkpoint(ckpt_dir, tag="policy")
        if self.critic is not None:
            self.critic.save_checkpoint(ckpt_dir, tag="critic")

    def load(self, ckpt_dir: str) -> None:
        self.policy.load_checkpoint(ckpt_dir, tag="policy")
        if self.critic is not None:
            self.critic.load_checkpoint(ckpt_dir, tag="critic")


class LearnerGroup:
    """Driver-side handle: starts ``scaling.num_workers`` ranks and fans calls out."""

    def __init__(self, spec):
        s = spec.scaling
        opts = {"num_cpus": s.cpus_per_worker, "num_gpus": s.gpus_per_worker if s.use_gpu else 0,
                "runtime_env": {"env_vars": dict(QUIET_ENV)}}
        self.world = s.num_workers
        self.workers = [LearnerWorker.options(**opts).remote(spec, r, self.world) for r in range(self.world)]
        master = ray.get(self.workers[0].address.remote())
        ray.get([w.setup.remote(master) for w in self.workers])

    def _all(self, method: str, *args):
        return ray.get([getattr(w, method).remote(*args) for w in self.workers])

    def compute(self, batch: dict) -> dict:
        ref = ray.put(batch)
        parts = self._all("compute", ref)
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def update(self, batch: dict, kl_coef: float, iteration: int) -> dict:
        return self._all("update", ray.put(batch), kl_coef, iteration)[0]

    def publish_weights(self) -> tuple[list, int]:
        return self._all("publish_weights")[0]

    def score_texts(self, prompts, responses) -> torch.Tensor:
        return ray.get(self.workers[0].score_texts.remote(prompts, responses))

    def export(self, out_dir: str, tokenizer_dir: str) -> None:
        self._all("export", out_dir, tokenizer_dir)

    def save(self, ckpt_dir: str) -> None:
        self._all("save", ckpt_dir)

    def load(self, ckpt_dir: str) -> None:
        self._all("load", ckpt_dir)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
