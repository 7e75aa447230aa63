"""DPO, IPO, SimPO and ORPO losses against values computed by hand from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from raystages.stages.dpo_losses import (dpo_sigmoid_loss, ipo_loss, log1mexp, orpo_loss, sequence_logps,
                                         simpo_loss)
from raystages.stages.losses import IGNORE


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_sequence_logps_sums_only_the_response_tokens():
    # One row, 4 positions, vocabulary 2. Labels: prompt (ignored), then tokens 1, 0 and a
    # padding position; each is predicted from the logits one position earlier.
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [3.0, -1.0], [9.0, 9.0]]])
    labels = torch.tensor([[IGNORE, 1, 0, IGNORE]])

    def logp(row, k):
        return row[k] - math.log(sum(math.exp(x) for x in row))

    total, n = sequence_logps(logits, labels)
    assert n.tolist() == [2]
    assert total.item() == pytest.approx(logp([2.0, 0.0], 1) + logp([0.0, 1.0], 0), rel=1e-6)
    # Garbage logits at unlabelled positions change nothing.
    logits[0, 2] = torch.tensor([50.0, -50.0])
    assert sequence_logps(logits, labels)[0].item() == pytest.approx(total.item(), rel=1e-6)


def test_dpo_sigmoid_by_hand():
    # β = 0.1; policy gains 0.5 nats on chosen and loses 0.5 on rejected vs the reference:
    # h = 0.1 · (0.5 - (-0.5)) = 0.1, loss = -log σ(0.1).
    pc, pr, rc, rr = _t(-1.0), _t(-2.0), _t(-1.5), _t(-1.5)
    got = dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.1)
    assert got.item() == pytest.approx(-_log_sigmoid(0.1), rel=1e-12)
    assert got.item() == pytest.approx(0.6443966600735709, rel=1e-12)
    # cDPO, ε = 0.2: 0.8·(-log σ(0.1)) + 0.2·(-log σ(-0.1)).
    got = dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    assert got.item() == pytest.approx(-0.8 * _log_sigmoid(0.1) - 0.2 * _log_sigmoid(-0.1), rel=1e-12)
    # At the reference the loss is log 2 whatever β.
    assert dpo_sigmoid_loss(rc, rr, rc, rr, beta=3.0).item() == pytest.approx(math.log(2), rel=1e-12)
    # Per pair, and finite far out.
    big = dpo_sigmoid_loss(_t(0.0, -500.0), _t(-500.0, 0.0), _t(0.0, 0.0), _t(0.0, 0.0), beta=1.0)
    assert big.shape == (2,) and big[0].item() == pytest.approx(0.0, abs=1e-12) and big[1].item() == pytest.approx(500.0)


def test_ipo_by_hand():
    # h = (−1 − −1.5) − (−2 − −1.5) = 1; β = 0.25 → target 1/(2β) = 2; loss (1 − 2)² = 1.
    got = ipo_loss(_t(-1.0), _t(-2.0), _t(-1.5), _t(-1.5), beta=0.25)
    assert got.item() == pytest.approx(1.0, rel=1e-12)
    # At the target the loss is 0, and past it the loss grows again (no push to infinity).
    assert ipo_loss(_t(0.0), _t(-2.0), _t(0.0), _t(0.0), beta=0.25).item() == pytest.approx(0.0, abs=1e-12)
    assert ipo_loss(_t(0.0), _t(-3.0), _t(0.0), _t(0.0), beta=0.25).item() == pytest.approx(1.0, rel=1e-12)


def test_simpo_by_hand():
    # Mean log-probs −0.5 and −1.0, β = 2, γ = 0.5: −log σ(2·0.5 − 0.5) = −log σ(0.5).
    got = simpo_loss(_t(-0.5), _t(-1.0), beta=2.0, gamma=0.5)
    assert got.item() == pytest.approx(-_log_sigmoid(0.5), rel=1e-12)
    # γ is a margin: with equal rewards the loss is −log σ(−γ) > log 2.
    assert simpo_loss(_t(-1.0), _t(-1.0), beta=2.0, gamma=0.5).item() == pytest.approx(-_log_sigmoid(-0.5))


def test_orpo_by_hand():
    # Mean log-probs ln 0.5 (P = 0.5, odds 1) and ln 0.2 (odds 0.25); λ = 0.1:
    # −ln 0.5 + 0.1 · −log σ(ln 1 − ln 0.25) = ln 2 + 0.1 · ln(1 + 0.25).
    got = orpo_loss(_t(math.log(0.5)), _t(math.log(0.2)), lam=0.1)
    assert got.item() == pytest.approx(math.log(2) + 0.1 * math.log(1.25), rel=1e-12)
    # λ = 0 is plain SFT on the chosen answer (mean NLL per token).
    assert orpo_loss(_t(-0.3), _t(-0.1), lam=0.0).item() == pytest.approx(0.3, rel=1e-12)


def test_log1mexp_is_accurate_at_both_ends():
    x = _t(-1e-10, -0.1, -0.7, -1.0, -50.0)
    want = [math.log(-math.expm1(v)) for v in x.tolist()]
    assert log1mexp(x).tolist() == pytest.approx(want, rel=1e-12)
    assert torch.isfinite(log1mexp(torch.tensor([-1e-6, -80.0]))).all()


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "simpo", "orpo"])
def test_gradients_raise_chosen_and_lower_rejected(name):
    """From a point where the pair is not yet separated (IPO: below its target), descending
    the loss raises the chosen answer's log-prob and lowers the rejected one's."""
    pc, pr = _t(-1.0, -2.0).requires_grad_(), _t(-1.2, -1.5).requires_grad_()
    ref_c, ref_r = _t(-1.1, -1.8), _t(-1.1, -1.6)
    loss = {"sigmoid": lambda: dpo_sigmoid_loss(pc, pr, ref_c, ref_r, beta=0.1, label_smoothing=0.1),
            "ipo": lambda: ipo_loss(pc, pr, ref_c, ref_r, beta=0.1),
            "simpo": lambda: simpo_loss(pc, pr, beta=2.0, gamma=0.5),
            "orpo": lambda: orpo_loss(pc, pr, lam=0.5)}[name]().sum()
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all(), (pc.grad, pr.grad)


def test_the_reference_only_shifts_the_dpo_margin():
    # DPO depends on the policy only through π_c − π_r; the reference sets the origin.
    a = dpo_sigmoid_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), beta=0.5)
    b = dpo_sigmoid_loss(_t(-5.0), _t(-7.0), _t(-2.0), _t(-2.0), beta=0.5)
    c = dpo_sigmoid_loss(_t(-1.0), _t(-3.0), _t(-1.0), _t(-3.0), beta=0.5)
    assert a.item() == pytest.approx(b.item()) and c.item() == pytest.approx(math.log(2))
