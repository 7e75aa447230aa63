"""The losses of SFT and reward modelling as pure tensor functions (no model, no runner).

Conventions: ``B`` sequences of ``T`` tokens, vocabulary ``V``. ``labels`` are aligned with
``input_ids`` as in Hugging Face causal LMs: ``labels[b, t]`` is the token the model should
emit at position ``t``, predicted from ``logits[b, t - 1]``; ``IGNORE`` (-100) marks tokens
that carry no loss (prompt, padding on either side, packing gaps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from raystages.data import IGNORE


def token_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy of each labelled position, 0 where the label is ``IGNORE``.

    ``logits``: ``(B, T, V)``; ``labels``: ``(B, T)``; returns ``(B, T - 1)`` fp32: entry
    ``t`` is ``-log p(labels[:, t + 1] | logits[:, t])``. Position 0 has no prediction, so
    ``labels[:, 0]`` is never used. Computed in fp32 whatever the logits' dtype.
    """
    pred = logits[:, :-1].float()
    target = labels[:, 1:]
    losses = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                             ignore_index=IGNORE, reduction="none")
    return losses.view(target.shape)


def token_ce_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy over supervised tokens, and how many there were.

    ``logits``: ``(B, T, V)``; ``labels``: ``(B, T)``. Returns ``(sum, count)``, both 0-dim;
    ``count`` is an integer tensor (see :func:`token_nll`).
    """
    return token_nll(logits, labels).sum(), (labels[:, 1:] != IGNORE).sum()


def masked_token_ce(logits: Tensor, labels: Tensor, normalizer: float | Tensor | None = None) -> Tensor:
    """Mean cross-entropy per supervised token: ``sum / normalizer``.

    ``logits``: ``(B, T, V)``; ``labels``: ``(B, T)``; returns a 0-dim tensor.

    ``normalizer`` defaults to this batch's supervised-token count, which makes the value
    the token-level mean of the batch. Splitting a batch into micro-batches and averaging
    their means weights a short example's tokens more than a long one's; passing the whole
    batch's token count as ``normalizer`` to every micro-batch instead makes the sum of the
    micro-batch losses (and of their gradients) exactly the large batch's. A batch without
    a supervised token gives 0 with a zero gradient, never NaN.
    """
    total, count = token_ce_sum(logits, labels)
    if normalizer is None:
        normalizer = count.clamp(min=1)
    return total / normalizer


def pairwise_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float | None = None,
                  center_coef: float = 0.0) -> Tensor:
    """Bradley-Terry loss of a reward model, averaged over pairs.

    ``r_chosen``, ``r_rejected``: ``(B,)`` scalar rewards; ``margin``: ``(B,)`` or a scalar,
    how much more the chosen answer should score (Llama 2, Touvron et al. 2023, eq. 2).
    Returns the 0-dim ``mean(-log σ(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)²)``.
    The centring term (Eisenstein et al. 2023) pins the reward's free offset near zero, so
    rewards stay comparable between runs. ``-log σ(x)`` is computed as ``softplus(-x)``:
    finite for any ``x``.
    """
    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        diff = diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    loss = F.softplus(-diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen.float() + r_rejected.float()) ** 2).mean()
    return loss


def pairwise_accuracy(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Share of pairs ranked the right way round; a tie counts as wrong. ``(B,)`` -> 0-dim."""
    return (r_chosen > r_rejected).float().mean()
