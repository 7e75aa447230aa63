"""Per-token losses, KL estimators, log-prob helpers and loss aggregation for RL on LLMs.

Shape conventions as in :mod:`raystages.rl.advantages`: ``(B, T)`` per-token
tensors, ``mask`` with 1 on real response tokens. Inputs are masked with
``torch.where`` *before* arithmetic so that garbage at padding (``-inf``
log-probs, NaN) reaches neither the loss nor its gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from raystages.rl.advantages import masked_mean, masked_sum

__all__ = [
    "LOG_RATIO_CLAMP",
    "KL_TOKEN_CAP",
    "kl_estimate",
    "policy_loss",
    "value_loss",
    "entropy_from_logits",
    "logprobs_from_logits",
    "aggregate_loss",
    "AdaptiveKLController",
    "FixedKLController",
]

# exp(20) ~ 4.9e8 is finite in fp16/bf16/fp32; beyond it a ratio is meaningless
# anyway (the sample is off-policy by a factor of 10^8) and would overflow.
LOG_RATIO_CLAMP = 20.0

# k3 is unbiased but heavy-tailed: a sampled token the policy now nearly forbids and the
# reference liked (pi/ref = 1e-3) adds exp(-log-ratio) ~ 1000 nats. One such token among 64
# responses moved a CI run's mean from 1.5 to 16.5 and tripped limits.max_kl on a policy
# whose reward had not moved. Capping each token's term (verl's low_var_kl caps at 10 too)
# bounds what one sample adds to the guard, the penalty and its gradient, while broad drift
# still shows in full.
KL_TOKEN_CAP = 10.0


def _masked_log_ratio(a: Tensor, b: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    m = torch.ones_like(a, dtype=torch.bool) if mask is None else torch.broadcast_to(mask, a.shape).bool()
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    lr = torch.where(m, a, zero) - torch.where(m, b, zero)
    return lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), m


def kl_estimate(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    kind: Literal["k1", "k2", "k3"],
    mask: Tensor | None = None,
    cap: float | None = None,
) -> Tensor:
    """Per-token Monte-Carlo estimators of KL(pi || ref) for tokens sampled from pi.

    From J. Schulman, "Approximating KL Divergence" (2020,
    http://joschu.net/blog/kl-approx.html). ``logprobs``, ``ref_logprobs``:
    ``(B, T)``; returns ``(B, T)``. With ``lr = logprobs - ref_logprobs``
    (clamped to ``[-20, 20]`` so ``exp`` cannot overflow):

    * ``k1 = lr``: unbiased, high variance, negative on some tokens.
    * ``k2 = 0.5 * lr**2``: biased but low variance, always >= 0.
    * ``k3 = exp(-lr) - 1 + lr``: unbiased and always >= 0 (it is
      ``(r - 1) - log r`` with ``r = ref/pi``; ``log`` is concave); GRPO's KL term.

    If ``mask`` is given, masked positions are 0. With ``cap``, each token's estimate is
    clamped to ``[-cap, cap]`` (a capped token passes no gradient), as the trainers pass
    ``KL_TOKEN_CAP``.
    """
    lr, m = _masked_log_ratio(logprobs, ref_logprobs, mask)
    if kind == "k1":
        kl = lr
    elif kind == "k2":
        kl = 0.5 * lr.square()
    elif kind == "k3":
        kl = torch.expm1(-lr) + lr  # expm1 keeps precision when lr ~ 0
    else:
        raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")
    if cap is not None:
        kl = kl.clamp(-cap, cap)
    return torch.where(m, kl, torch.zeros_like(kl))


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate as a per-token loss (Schulman et al. 2017, arXiv:1707.06347).

    ``logprobs`` (current policy, with grad), ``old_logprobs`` (behaviour
    policy), ``mask``: ``(B, T)``; ``advantages``: ``(B, T)`` or ``(B,)``
    (broadcast over tokens, e.g. GRPO). With ``ratio = exp(logprobs - old)``
    (log-ratio clamped to ``[-20, 20]``: stale samples must not overflow ``exp``)::

        loss = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high))

    ``clip_eps_high`` (default ``clip_eps``) allows an asymmetric upper bound
    ("clip-higher", DAPO, Yu et al. 2025) so low-probability tokens can grow.
    ``dual_clip=c`` (c > 1; Ye et al. 2020, arXiv:1912.09729) caps the loss at
    ``-c * A`` for ``A < 0``: with a huge ratio the plain PPO loss is unbounded
    there and a single stale token can dominate the step.

    Returns ``(loss (B, T), stats)``; loss is 0 at masked positions (reduce it
    with :func:`aggregate_loss`). ``stats`` (detached scalars, masked means over
    this call's tokens): ``clip_frac`` (tokens where the clipped term is
    active), ``dual_clip_frac``, ``approx_kl`` (k3 estimate of KL(old || new)),
    ``ratio_mean``.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (got {dual_clip})")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio, m = _masked_log_ratio(logprobs, old_logprobs, mask)
    if advantages.dim() == logprobs.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    adv = torch.where(m, torch.broadcast_to(advantages, logprobs.shape), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + eps_high)
    loss = torch.maximum(pg_unclipped, pg_clipped)
    dual_active = torch.zeros_like(m)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual_active = (adv < 0) & (loss > cap)
        loss = torch.where(dual_active, cap, loss)
    loss = torch.where(m, loss, torch.zeros_like(loss))
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((pg_clipped > pg_unclipped).float(), m),
            "dual_clip_frac": masked_mean(dual_active.float(), m),
            # samples come from the old policy, so r = new/old gives KL(old || new)
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value-function loss of PPO (Schulman et al. 2017; OpenAI baselines ppo2).

    ``values`` (current critic), ``old_values`` (critic at rollout time),
    ``returns`` (GAE targets), ``mask``: ``(B, T)``::

        loss = 0.5 * max((v - R)**2, (old + clip(v - old, -eps, eps) - R)**2)

    Taking the max makes clipping pessimistic: the critic gets no credit for
    moving further than ``eps`` from its rollout-time prediction.
    ``clip_eps=None`` gives the plain ``0.5 * (v - R)**2``. Returns
    ``(loss (B, T), stats)``, loss 0 at masked positions; stats: ``clip_frac``
    (tokens where the clipped term is larger), ``values_mean``.
    """
    m = torch.broadcast_to(mask, values.shape).bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    v = torch.where(m, values, zero)
    ret = torch.where(m, returns, zero)
    unclipped = (v - ret).square()
    if clip_eps is None:
        loss, clipped_active = 0.5 * unclipped, torch.zeros_like(m)
    else:
        old = torch.where(m, old_values, zero)
        clipped = (old + (v - old).clamp(-clip_eps, clip_eps) - ret).square()
        loss, clipped_active = 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped
    loss = torch.where(m, loss, zero)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean(clipped_active.float(), m), "values_mean": masked_mean(v, m)}
    return loss, stats


def _upcast(logits: Tensor) -> Tensor:
    # bf16 log_softmax over a 100k+ vocab loses several digits; do it in fp32.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax distribution per position. ``logits``: ``(B, T, V)`` -> ``(B, T)``.

    ``-inf`` logits (banned tokens) have p = 0 and contribute 0 with a finite
    gradient. Half-precision input is computed (and returned) in fp32.
    """
    logp = F.log_softmax(_upcast(logits), dim=-1)
    p = logp.exp()
    # Replace -inf before multiplying: 0 * -inf is NaN in both passes.
    logp_safe = torch.where(p > 0, logp, torch.zeros_like(logp))
    return -(p * logp_safe).sum(dim=-1)


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probability of ``tokens`` ``(B, T)`` under ``logits`` ``(B, T, V)`` -> ``(B, T)``.

    ``log_softmax`` subtracts the max logit internally, so large logits do not
    overflow as ``log(softmax(x))`` would. Half-precision input is computed in fp32.
    """
    logp = F.log_softmax(_upcast(logits), dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def aggregate_loss(
    loss_per_token: Tensor,
    mask: Tensor,
    mode: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean",
    global_token_count: float | Tensor | None = None,
    global_seq_count: float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss ``(B, T)`` with ``mask`` ``(B, T)`` to a scalar.

    Modes:

    * ``"token_mean"``: ``sum(loss * mask) / N``; every token weighs the same
      (DAPO, Yu et al. 2025, arXiv:2503.14476) so long responses are not
      down-weighted.
    * ``"seq_mean_token_mean"``: mean over rows of each row's token mean (the
      original GRPO formulation).
    * ``"seq_mean_token_sum"``: mean over rows of each row's token sum.

    Rows with no unmasked token are not counted as sequences.

    Without the ``global_*`` counts the denominators are local (this call's
    tokens / rows). Averaging per-micro-batch means is wrong when micro-batches
    hold different token counts. To get exactly the full mini-batch loss and
    gradient:

    1. ``global_token_count`` = number of unmasked tokens (mask sum) in the
       whole mini-batch, over all micro-batches **and** all data-parallel
       ranks: sum the local counts of every micro-batch on a rank, then
       ``all_reduce(SUM)`` across ranks. (``global_seq_count`` likewise counts
       non-empty rows, for the ``seq_*`` modes.)
    2. Call ``backward()`` on each micro-batch's returned loss as is: do not
       divide by the number of gradient-accumulation steps. The sum of the
       returned values over all micro-batches and ranks is the full-batch loss.
    3. DDP/FSDP/DeepSpeed *average* gradients across the ``world_size`` ranks,
       which would divide the result by ``world_size`` a second time. So
       multiply each micro-batch loss by ``world_size`` before ``backward()``
       (equivalently pass ``global_token_count / world_size``). After the
       averaging all-reduce every rank then holds exactly the gradient of the
       full-batch token mean.

    Returns a 0-dim tensor; 0 (not NaN) when nothing is unmasked.
    """
    m = torch.broadcast_to(mask, loss_per_token.shape)
    if mode == "token_mean":
        total = masked_sum(loss_per_token, m)
        if global_token_count is None:
            return masked_mean(loss_per_token, m)
        return total / _positive(global_token_count, total)
    if mode == "seq_mean_token_mean":
        per_seq = masked_mean(loss_per_token, m, dim=-1)
    elif mode == "seq_mean_token_sum":
        per_seq = masked_sum(loss_per_token, m, dim=-1)
    else:
        raise ValueError(
            f"unknown aggregation mode {mode!r}; expected 'token_mean', "
            "'seq_mean_token_mean' or 'seq_mean_token_sum'"
        )
    has_token = (m != 0).any(dim=-1)
    if global_seq_count is None:
        return masked_mean(per_seq, has_token)
    total = masked_sum(per_seq, has_token)
    return total / _positive(global_seq_count, total)


def _positive(count: float | Tensor, like: Tensor) -> Tensor:
    c = torch.as_tensor(count, dtype=like.dtype, device=like.device)
    # A zero count means every mask was empty, so the numerator is 0 too; return 0, not NaN.
    return torch.where(c > 0, c, torch.ones_like(c))


class FixedKLController:
    """Constant KL coefficient; same interface as :class:`AdaptiveKLController`."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models
    from Human Preferences", arXiv:1909.08593, section 2.2).

    A proportional controller steering the observed KL toward ``target``::

        e = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + e * n_steps / horizon

    The clip bounds how fast the coefficient can move when the KL is far off
    target; ``n_steps`` is the number of samples (or steps) since the last
    update, so the adaptation rate is independent of the batch size.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0 (got target={target}, horizon={horizon})")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
