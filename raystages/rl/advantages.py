"""Masked statistics, reward shaping and advantage estimators for RL on LLMs.

Shape conventions: ``B`` = batch (one row per sampled response), ``T`` =
response length. ``mask`` is a bool or float tensor shaped like the data with
1 on real response tokens; gaps (e.g. tool output spliced into a response) and
fully masked rows are allowed.

Masked positions may hold garbage (padding logits, ``-inf`` log-probs, NaN):
every function selects with ``torch.where`` *before* arithmetic, because
``x * 0`` is NaN when ``x`` is inf/NaN, and that NaN would also leak into the
backward pass.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "token_rewards",
    "gae",
    "group_advantages",
]


def _weights(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Broadcast ``mask`` to ``x`` and return ``(x with masked entries zeroed, weights)``."""
    x, mask = torch.broadcast_tensors(x, mask)
    w = mask.to(x.dtype) if x.is_floating_point() else mask.float()
    return torch.where(w != 0, x, torch.zeros((), dtype=x.dtype, device=x.device)), w


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Sum of ``x * mask``; ``x``, ``mask``: any shape, e.g. ``(B, T)``.

    Returns a scalar (``dim=None``) or ``x`` reduced over ``dim``.
    """
    xs, w = _weights(x, mask)
    if dim is None:
        return (xs * w).sum()
    return (xs * w).sum(dim=dim, keepdim=keepdim)


def _safe_count(w: Tensor, dim: int | None, keepdim: bool) -> Tensor:
    n = w.sum() if dim is None else w.sum(dim=dim, keepdim=keepdim)
    # Dividing by 1 when nothing is unmasked gives 0 (the sum is 0) rather than
    # 0/0, and keeps the gradient finite (a torch.where over a NaN branch would not).
    return torch.where(n > 0, n, torch.ones_like(n))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Mean of ``x`` over unmasked entries; ``x``, ``mask``: e.g. ``(B, T)``.

    Returns a scalar (``dim=None``) or ``x`` reduced over ``dim``; an empty
    selection (fully masked input or row) gives 0, never NaN.
    """
    xs, w = _weights(x, mask)
    total = (xs * w).sum() if dim is None else (xs * w).sum(dim=dim, keepdim=keepdim)
    return total / _safe_count(w, dim, keepdim)


def masked_var(
    x: Tensor, mask: Tensor, unbiased: bool = True, dim: int | None = None, keepdim: bool = False
) -> Tensor:
    """Variance of ``x`` over unmasked entries; ``x``, ``mask``: e.g. ``(B, T)``.

    With ``unbiased`` applies Bessel's correction ``n / (n - 1)`` with ``n`` the
    mask sum. Fewer than 2 unmasked entries (unbiased) or none (biased) gives 0:
    such a sample carries no spread information and NaN would poison whitening.
    """
    # Zero masked entries first: (inf - mean)**2 would be NaN in the backward pass.
    xs, w = _weights(x, mask)
    mean = masked_mean(xs, w, dim=dim, keepdim=True)
    var = masked_mean((xs - mean) ** 2, w, dim=dim, keepdim=keepdim)
    if not unbiased:
        return var
    n = w.sum() if dim is None else w.sum(dim=dim, keepdim=keepdim)
    denom = torch.where(n > 1, n - 1, torch.ones_like(n))
    return var * torch.where(n > 1, n / denom, torch.zeros_like(n))


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` ``(B, T)`` to zero mean / unit (unbiased) variance over all unmasked entries.

    Statistics are over the whole local tensor (as in TRL/OpenRLHF); under data
    parallelism they are per-rank unless the caller all-reduces them. With
    ``shift_mean=False`` the mean is added back: only the scale changes, which
    keeps the sign of e.g. a mostly-positive advantage batch. Masked positions
    are 0 in the output. Returns ``(B, T)``.
    """
    xs, w = _weights(x, mask)
    mean = masked_mean(xs, w)
    var = masked_var(xs, w, unbiased=True)
    out = (xs - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(w != 0, out, torch.zeros_like(out))


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token reward with a KL penalty, as in InstructGPT (Ouyang et al. 2022) / OpenRLHF.

    ``scores``: ``(B,)`` sequence-level reward-model scores; ``kl``: ``(B, T)``
    per-token KL estimate (see ``kl_estimate``); ``mask``: ``(B, T)``.
    Returns ``(B, T)``: ``-kl_coef * kl`` on every unmasked token, plus the
    score at the *last* unmasked token of each row (the reward model judged the
    complete response, so the credit lands where the response ends). Rows with
    no unmasked token get all zeros.
    """
    m = mask.bool()
    B, T = kl.shape
    rewards = torch.where(m, -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    # arange * mask is strictly increasing over real tokens, so its argmax is the
    # last real token even with gaps or left padding.
    pos = torch.arange(T, device=kl.device, dtype=torch.float32).expand(B, T) * m
    last = pos.argmax(dim=1)
    has_token = m.any(dim=1)
    score = torch.where(has_token, scores.to(kl.dtype), torch.zeros_like(scores, dtype=kl.dtype))
    return rewards.scatter_add(1, last.unsqueeze(1), score.unsqueeze(1))


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438).

    ``rewards``, ``values``, ``mask``: ``(B, T)``. Returns ``(advantages,
    returns)``, both ``(B, T)``::

        delta_t = r_t + gamma * V_{t'} - V_t
        A_t     = delta_t + gamma * lam * A_{t'}

    where ``t'`` is the next *unmasked* position: masked gaps are skipped, so a
    tool-output span inside a response does not count as a time step and the
    next real token's value/advantage carries across it. After the last real
    token the bootstrap is 0 (the response ended: terminal state). Rewards and
    values at masked positions are ignored. ``returns = advantages + values``
    (the value-function target). Both outputs are 0 at masked positions.
    Computed without gradient: these are targets, not part of the graph.
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    r = torch.where(m, rewards, zero)
    v = torch.where(m, values, zero)
    B, T = v.shape
    next_value = v.new_zeros(B)
    next_adv = v.new_zeros(B)
    advs = [next_adv] * T
    for t in reversed(range(T)):
        mt = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        a_t = torch.where(mt, delta + gamma * lam * next_adv, zero)
        # On a masked step keep the carried values so the recursion jumps the gap.
        next_value = torch.where(mt, v[:, t], next_value)
        next_adv = torch.where(mt, a_t, next_adv)
        advs[t] = a_t
    advantages = torch.stack(advs, dim=1)
    returns = torch.where(m, advantages + v, zero)
    return advantages, returns


@torch.no_grad()
def group_advantages(
    scores: Tensor,
    group_size: int,
    kind: Literal["grpo", "rloo"],
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Critic-free, group-relative sequence advantages. ``scores``: ``(num_prompts * group_size,)``.

    Rows are group-contiguous: ``[p0s0, p0s1, ..., p1s0, ...]``. Returns ``(B,)``;
    broadcast over tokens with ``adv[:, None] * mask``.

    * ``"grpo"`` (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300):
      ``(r - mean_group) / (std_group + eps)`` with the unbiased std (as TRL).
      ``normalize_std=False`` drops the division (Dr. GRPO, Liu et al. 2025,
      arXiv:2503.20783): dividing by std up-weights near-unanimous groups.
    * ``"rloo"`` (Ahmadian et al. 2024, arXiv:2402.14740):
      ``r_i - mean_{j != i} r_j``, the leave-one-out baseline, which keeps the
      estimator unbiased because the baseline does not depend on ``r_i``.
      ``normalize_std`` is ignored.

    Raises ``ValueError`` if ``group_size < 2`` (no baseline can be formed) or
    the batch is not a multiple of ``group_size``.
    """
    if group_size < 2:
        raise ValueError(
            f"group_advantages needs group_size >= 2 (got {group_size}): a group-relative "
            "baseline needs at least two samples per prompt"
        )
    if scores.dim() != 1 or scores.numel() % group_size != 0:
        raise ValueError(
            f"scores must be 1-D with a length divisible by group_size={group_size}, "
            f"got shape {tuple(scores.shape)}"
        )
    g = scores.float().view(-1, group_size)
    if kind == "grpo":
        adv = g - g.mean(dim=1, keepdim=True)
        if normalize_std:
            adv = adv / (g.std(dim=1, keepdim=True, unbiased=True) + eps)
    elif kind == "rloo":
        loo_mean = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
        adv = g - loo_mean
    else:
        raise ValueError(f"unknown group advantage kind {kind!r}; expected 'grpo' or 'rloo'")
    return adv.reshape(-1).to(scores.dtype if scores.is_floating_point() else torch.float32)
