"""SFT and reward-model losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from raystages.stages.losses import (IGNORE, masked_token_ce, pairwise_accuracy, pairwise_loss,
                                     token_ce_sum)


def _nll(logits_row: list[float], target: int) -> float:
    return -(logits_row[target] - math.log(sum(math.exp(x) for x in logits_row)))


def test_masked_token_ce_by_hand():
    # One sequence of 3 tokens over a 2-token vocabulary: the prompt token (position 0) has no
    # label; positions 1 and 2 are supervised, predicted from logits at positions 0 and 1.
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE, 1, 0]])
    want = (_nll([2.0, 0.0], 1) + _nll([0.0, 1.0], 0)) / 2
    assert masked_token_ce(logits, labels).item() == pytest.approx(want, rel=1e-6)
    total, count = token_ce_sum(logits, labels)
    assert count.item() == 2 and total.item() == pytest.approx(2 * want, rel=1e-6)
    # Only the second token supervised: the first prediction no longer counts.
    labels = torch.tensor([[IGNORE, IGNORE, 0]])
    assert masked_token_ce(logits, labels).item() == pytest.approx(_nll([0.0, 1.0], 0), rel=1e-6)


def test_padding_on_either_side_gives_the_same_loss():
    torch.manual_seed(0)
    body = torch.randn(1, 4, 7)
    labels = torch.tensor([[IGNORE, 3, 5, 1]])
    pad_logits = torch.randn(1, 2, 7) * 10  # garbage at padding must not count
    pad_labels = torch.full((1, 2), IGNORE)
    right = masked_token_ce(torch.cat([body, pad_logits], 1), torch.cat([labels, pad_labels], 1))
    left = masked_token_ce(torch.cat([pad_logits, body], 1), torch.cat([pad_labels, labels], 1))
    plain = masked_token_ce(body, labels)
    assert right.item() == pytest.approx(plain.item(), rel=1e-6)
    assert left.item() == pytest.approx(plain.item(), rel=1e-6)


def test_fully_masked_rows_add_nothing_and_an_all_masked_batch_is_zero_without_nan():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.tensor([[IGNORE, 4, 2, 9, IGNORE], [IGNORE] * 5])
    both = masked_token_ce(logits, labels)
    alone = masked_token_ce(logits[:1], labels[:1])
    assert both.item() == pytest.approx(alone.item(), rel=1e-6)
    empty = masked_token_ce(logits, torch.full((2, 5), IGNORE))
    empty.backward()
    assert empty.item() == 0.0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


def test_gradient_accumulation_with_the_step_normalizer_equals_one_large_batch():
    """Micro-batches with 1 and 7 supervised tokens: averaging their means is wrong,
    dividing each sum by the whole step's token count is exact (values and gradients)."""
    torch.manual_seed(2)
    w = torch.randn(6, 13, requires_grad=True)  # a "model": logits = x @ w
    x = torch.randn(4, 6, 6)
    labels = torch.full((4, 6), IGNORE)
    labels[0, 5] = 3  # micro-batch A: 1 token
    labels[1:, 1:] = torch.randint(0, 13, (3, 5))
    labels[1, 1:4] = IGNORE  # micro-batch B: rows 1-3, 2 + 5 + 5 = 12 tokens
    big = masked_token_ce(x @ w, labels)
    (g_big,) = torch.autograd.grad(big, w)

    parts = [(x[:1], labels[:1]), (x[1:], labels[1:])]
    n_total = sum(int((lab[:, 1:] != IGNORE).sum()) for _, lab in parts)
    accum = sum(masked_token_ce(xb @ w, lb, normalizer=n_total) for xb, lb in parts)
    (g_accum,) = torch.autograd.grad(accum, w)
    assert accum.item() == pytest.approx(big.item(), rel=1e-6)
    assert torch.allclose(g_accum, g_big, atol=1e-7)
    naive = sum(masked_token_ce(xb @ w, lb) for xb, lb in parts) / 2
    assert abs(naive.item() - big.item()) > 0.05  # the naive mean is measurably different


def test_runner_step_normalizer_matches_deepspeed_scaling(tmp_path):
    """The runner's divisor: DeepSpeed divides each micro-batch loss by grad_accum and
    averages over ranks, so each micro-batch must divide by total / (grad_accum * world)."""
    import torch.distributed as dist

    from raystages.stages.sft import SftStage
    from raystages.train.worker import _step_normalizer

    batches = [{"labels": torch.tensor([[IGNORE, 1, 2, IGNORE]])},
               {"labels": torch.tensor([[IGNORE, IGNORE, 2, 3], [IGNORE, 4, 4, 4]])}]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert _step_normalizer(SftStage(), batches, world=1) == pytest.approx(7 / 2)
        assert _step_normalizer(SftStage(), batches[:1], world=2) == pytest.approx(2 / 2)

        class NoCount(SftStage):
            def count(self, batch):
                return None

        assert _step_normalizer(NoCount(), batches, world=1) is None
    finally:
        dist.destroy_process_group()


def test_pairwise_loss_by_hand_with_margin_and_centring():
    r_c = torch.tensor([2.0, 0.0])
    r_r = torch.tensor([1.0, 0.5])
    no_margin = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert pairwise_loss(r_c, r_r).item() == pytest.approx(no_margin, rel=1e-6)
    margin = torch.tensor([0.5, 0.0])  # the first pair must win by 0.5: diff 1.0 -> 0.5
    with_margin = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.5))) / 2
    assert pairwise_loss(r_c, r_r, margin).item() == pytest.approx(with_margin, rel=1e-6)
    centred = with_margin + 0.1 * (3.0 ** 2 + 0.5 ** 2) / 2
    assert pairwise_loss(r_c, r_r, margin, center_coef=0.1).item() == pytest.approx(centred, rel=1e-6)
    assert pairwise_loss(r_c, r_r, 0.25).item() == pytest.approx(
        (math.log1p(math.exp(-0.75)) + math.log1p(math.exp(0.75))) / 2, rel=1e-6)


def test_pairwise_loss_is_finite_at_extremes_and_its_gradient_pushes_the_right_way():
    r_c = torch.tensor([1000.0, -1000.0], requires_grad=True)
    r_r = torch.tensor([-1000.0, 1000.0], requires_grad=True)
    loss = pairwise_loss(r_c, r_r)
    loss.backward()
    assert loss.item() == pytest.approx(1000.0)  # (0 + 2000) / 2
    assert torch.isfinite(r_c.grad).all()
    assert r_c.grad[1] < 0 < r_r.grad[1]  # the misranked pair: raise chosen, lower rejected
    assert r_c.grad[0].abs() < 1e-6


def test_pairwise_accuracy_counts_ties_as_wrong():
    acc = pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 1.0, 1.0]))
    assert acc.item() == pytest.approx(0.5)
