"""Pure tensor math of RL fine-tuning for LLMs (no Ray, no model).

The implementation is split in two modules, re-exported here so callers can
``from raystages.rl.algos import gae, policy_loss, ...``:

* :mod:`raystages.rl.advantages`: masked statistics and whitening, KL-shaped
  token rewards, GAE, GRPO/RLOO group advantages.
* :mod:`raystages.rl.losses`: KL estimators and controllers, PPO policy and
  value losses, entropy / log-probs from logits, micro-batch-safe loss
  aggregation.
"""

from raystages.rl.advantages import (
    gae,
    group_advantages,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    token_rewards,
)
from raystages.rl.losses import (
    KL_TOKEN_CAP,
    LOG_RATIO_CLAMP,
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    entropy_from_logits,
    kl_estimate,
    logprobs_from_logits,
    policy_loss,
    value_loss,
)

__all__ = [
    "KL_TOKEN_CAP",
    "LOG_RATIO_CLAMP",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "kl_estimate",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "token_rewards",
    "value_loss",
]
