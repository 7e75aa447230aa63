"""Preference-optimisation losses without RL, as pure tensor functions (no model, no runner).

Every loss takes per-sequence log-probabilities of the response tokens, ``(B,)`` for ``B``
preference pairs, and returns the per-pair loss ``(B,)``; the stage averages it. Every
micro-batch holds the same number of pairs, so the mean of micro-batch means is the
step's exact mean over pairs: no count normaliser is needed (unlike SFT's token mean).

``policy_*`` are log-probs under the model being trained, ``ref_*`` under the frozen
reference (the SFT parent). ``-log σ(x)`` is computed as ``softplus(-x)``: finite for any x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from raystages.stages.losses import IGNORE, token_nll


def sequence_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-probability of each row's labelled tokens, and how many there were.

    ``logits``: ``(B, T, V)``; ``labels``: ``(B, T)`` with ``IGNORE`` outside the response
    (aligned as in Hugging Face causal LMs). Returns ``(logp_sum, n_tokens)``, both ``(B,)``;
    ``logp_sum / n_tokens`` is the length-normalised log-prob of SimPO and ORPO.
    """
    return -token_nll(logits, labels).sum(-1), (labels[:, 1:] != IGNORE).sum(-1)


def dpo_sigmoid_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                     ref_rejected: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7), conservative with ``label_smoothing`` ε > 0.

    ``h = β·[(π_c - ref_c) - (π_r - ref_r)]``; loss ``-(1-ε)·log σ(h) - ε·log σ(-h)``
    (cDPO, Mitchell 2023: the label is assumed flipped with probability ε). All inputs
    ``(B,)`` summed log-probs; returns ``(B,)``.
    """
    h = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return (1 - label_smoothing) * F.softplus(-h) + label_smoothing * F.softplus(h)


def ipo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17 with τ = β): ``(h - 1/(2β))²`` with
    ``h = (π_c - ref_c) - (π_r - ref_r)``. A squared loss regresses the log-ratio gap to a
    fixed target instead of pushing it to infinity as DPO does on deterministic
    preferences. Inputs ``(B,)`` (the stage passes per-token mean log-probs, as TRL does);
    returns ``(B,)``.
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return (h - 1 / (2 * beta)) ** 2


def simpo_loss(policy_chosen_mean: Tensor, policy_rejected_mean: Tensor, beta: float,
               gamma: float) -> Tensor:
    """SimPO (Meng et al. 2024, eq. 6): ``-log σ(β·ā_c - β·ā_r - γ)``, reference-free.

    ``ā`` are per-token mean log-probs ``(B,)`` (the implicit reward is ``β·ā``); ``γ`` is
    the target reward margin. Returns ``(B,)``.
    """
    return F.softplus(-(beta * (policy_chosen_mean - policy_rejected_mean) - gamma))


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Mächler 2012): ``log(-expm1(x))``
    near 0, ``log1p(-exp(x))`` far below it."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen_mean: Tensor, policy_rejected_mean: Tensor, lam: float) -> Tensor:
    """ORPO (Hong et al. 2024, eqs. 2-7): the SFT loss of the chosen answer plus
    ``λ·-log σ(log odds_c - log odds_r)``, reference-free.

    ``ā`` are per-token mean log-probs ``(B,)``, so ``P = exp(ā)`` and
    ``log odds = ā - log(1 - exp(ā))``; the SFT term is ``-ā_c`` (eq. 2 averages over the
    answer's tokens). Returns ``(B,)``.
    """
    log_odds = (policy_chosen_mean - log1mexp(policy_chosen_mean)) - (
        policy_rejected_mean - log1mexp(policy_rejected_mean))
    return -policy_chosen_mean + lam * F.softplus(-log_odds)
