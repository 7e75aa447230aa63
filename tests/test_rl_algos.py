"""Golden tests for raystages.rl.algos: expected numbers are worked out by hand
(see the comments) and written as literals, not recomputed with the code under test."""

import math

import pytest
import torch

from raystages.rl.algos import (
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    entropy_from_logits,
    gae,
    group_advantages,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)

NAN = float("nan")


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float32, **kw)


def close(actual, expected, atol=1e-6, rtol=1e-5):
    torch.testing.assert_close(actual, t(expected) if not torch.is_tensor(expected) else expected, atol=atol, rtol=rtol)


# ---------------------------------------------------------------- masked stats


def test_masked_stats():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = t([[1, 1, 0], [0, 0, 0]])
    close(masked_sum(x, m), 3.0)
    close(masked_mean(x, m), 1.5)
    close(masked_mean(x, m, dim=1), [1.5, 0.0])  # empty row -> 0
    close(masked_var(x, m), 0.5)  # ((-.5)^2 + .5^2) / (2 - 1)
    close(masked_var(x, m, unbiased=False), 0.25)
    close(masked_var(x, t([[1, 0, 0], [0, 0, 0]])), 0.0)  # n=1: no spread, not NaN
    zero = torch.zeros_like(m)
    for v in (masked_sum(x, zero), masked_mean(x, zero), masked_var(x, zero)):
        close(v, 0.0)


def test_masked_mean_ignores_garbage_in_padding():
    x = t([[2.0, NAN, float("-inf")]], requires_grad=True)
    out = masked_mean(x, t([[1, 0, 0]]))
    out.backward()
    close(out.detach(), 2.0)
    close(x.grad, [[1.0, 0.0, 0.0]])


def test_whiten():
    x = t([[1.0, 2.0, 3.0, 4.0]])
    # mean 2.5, unbiased var 5/3, std 1.2909944
    close(masked_whiten(x, torch.ones_like(x)), [[-1.1618950, -0.3872983, 0.3872983, 1.1618950]], atol=1e-5)
    x = t([[1.0, 100.0, 3.0]])
    m = t([[1, 0, 1]])
    # mean 2, unbiased var 2 -> +-1/sqrt(2); gap stays 0
    close(masked_whiten(x, m), [[-0.7071068, 0.0, 0.7071068]], atol=1e-5)
    close(masked_whiten(x, m, shift_mean=False), [[1.2928932, 0.0, 2.7071068]], atol=1e-5)
    close(masked_whiten(x, torch.zeros_like(m)), [[0.0, 0.0, 0.0]])


# ---------------------------------------------------------------- KL


def test_kl_estimators():
    lp = t([[-1.0, -2.0, -0.5]])
    ref = t([[-2.0, -1.0, -0.5]])  # log-ratio 1, -1, 0
    close(kl_estimate(lp, ref, "k1"), [[1.0, -1.0, 0.0]])
    close(kl_estimate(lp, ref, "k2"), [[0.5, 0.5, 0.0]])
    # exp(-1) - 1 + 1 = 0.3678794 ; exp(1) - 1 - 1 = 0.7182818
    close(kl_estimate(lp, ref, "k3"), [[0.3678794, 0.7182818, 0.0]])
    close(kl_estimate(lp, ref, "k3", mask=t([[1, 0, 1]])), [[0.3678794, 0.0, 0.0]])
    with pytest.raises(ValueError):
        kl_estimate(lp, ref, "k4")


def test_kl_clamped_and_k3_nonnegative():
    lp = t([[0.0, -100.0]])
    ref = t([[-100.0, 0.0]])  # log-ratio +100 / -100, clamped to +-20
    close(kl_estimate(lp, ref, "k1"), [[20.0, -20.0]])
    close(kl_estimate(lp, ref, "k2"), [[200.0, 200.0]])
    # exp(-20) - 1 + 20 = 19.000000002 ; exp(20) - 1 - 20 = 485165174.41
    close(kl_estimate(lp, ref, "k3"), [[19.0, 485165174.41]], rtol=1e-6)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 32, generator=g) * 3, torch.randn(64, 32, generator=g) * 3
    assert (kl_estimate(a, b, "k3") >= 0).all()
    assert (kl_estimate(a, b, "k2") >= 0).all()


def test_kl_cap_bounds_each_token_and_stops_its_gradient():
    lp = t([[-7.0, -1.0, 0.0]]).requires_grad_()
    ref = t([[0.0, 0.0, -1.0]])  # log-ratio -7, -1, +1
    # k3: e^7 - 1 - 7 = 1088.633 -> 10 ; e^1 - 1 - 1 = 0.7182818 ; e^-1 - 1 + 1 = 0.3678794
    close(kl_estimate(lp, ref, "k3"), [[1088.6332, 0.7182818, 0.3678794]], rtol=1e-6)
    kl = kl_estimate(lp, ref, "k3", cap=10.0)
    close(kl, [[10.0, 0.7182818, 0.3678794]])
    kl.sum().backward()
    # d k3 / d lp = 1 - e^-lr: 0 where capped, 1 - e = -1.7182818, 1 - e^-1 = 0.6321206
    close(lp.grad, [[0.0, -1.7182818, 0.6321206]])
    close(kl_estimate(t([[-30.0]]), t([[0.0]]), "k1", cap=10.0), [[-10.0]])


def test_kl_controllers():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(12.0, 1000)  # error 1.0 clipped to 0.2 -> x(1 + 0.2*0.1)
    assert c.value == pytest.approx(0.102)
    c.update(3.0, 1000)  # error -0.5 clipped to -0.2 -> x0.98
    assert c.value == pytest.approx(0.09996)
    c.update(6.6, 10000)  # error 0.1 -> x1.1
    assert c.value == pytest.approx(0.109956)
    f = FixedKLController(0.05)
    f.update(100.0, 10)
    assert f.value == 0.05


# ---------------------------------------------------------------- rewards / GAE


def test_token_rewards_placement():
    scores = t([1.0, 2.0, 3.0, 4.0, 5.0])
    kl = torch.full((5, 4), 0.5)
    mask = t(
        [
            [1, 1, 0, 0],  # right padding
            [1, 0, 1, 0],  # gap
            [0, 0, 0, 0],  # fully masked
            [1, 1, 1, 1],  # ends at the last column
            [0, 1, 1, 0],  # left padding
        ]
    )
    # -0.1 * 0.5 = -0.05 per real token, score added at the last real one
    expected = [
        [-0.05, 0.95, 0.0, 0.0],
        [-0.05, 0.0, 1.95, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [-0.05, -0.05, -0.05, 3.95],
        [0.0, -0.05, 4.95, 0.0],
    ]
    close(token_rewards(scores, kl, mask, kl_coef=0.1), expected)


def test_gae_by_hand():
    r = t([[1.0, 0.0, 2.0]])
    v = t([[0.5, 1.0, 1.5]])
    # gamma=0.9, lam=0.8, gamma*lam=0.72
    # t2: delta = 2 + 0 - 1.5 = 0.5                       A2 = 0.5
    # t1: delta = 0 + 0.9*1.5 - 1.0 = 0.35                A1 = 0.35 + 0.72*0.5 = 0.71
    # t0: delta = 1 + 0.9*1.0 - 0.5 = 1.4                 A0 = 1.4 + 0.72*0.71 = 1.9112
    adv, ret = gae(r, v, torch.ones_like(r), gamma=0.9, lam=0.8)
    close(adv, [[1.9112, 0.71, 0.5]])
    close(ret, [[2.4112, 1.71, 2.0]])


def test_gae_gap_and_fully_masked_row():
    r = t([[1.0, 99.0, 2.0, 99.0], [5.0, 5.0, 5.0, 5.0]])
    v = t([[0.5, 99.0, 1.5, NAN], [NAN, 1.0, 1.0, 1.0]])
    m = t([[1, 0, 1, 0], [0, 0, 0, 0]])
    # row 0: t2: delta = 2 - 1.5 = 0.5, A = 0.5 (bootstrap 0 after the last real token)
    #        t0 skips the gap: delta = 1 + 0.9*1.5 - 0.5 = 1.85, A = 1.85 + 0.72*0.5 = 2.21
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8)
    close(adv, [[2.21, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    close(ret, [[2.71, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


# ---------------------------------------------------------------- group advantages


def test_grpo_and_rloo_two_groups():
    s = t([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])  # 2 prompts x 3 samples
    # group 0: mean 2, unbiased std 1 ; group 1: mean 2, unbiased std sqrt(12) = 3.4641016
    close(
        group_advantages(s, 3, "grpo"),
        [-1.0, 0.0, 1.0, -0.5773503, -0.5773503, 1.1547005],
        atol=1e-5,
    )
    close(group_advantages(s, 3, "grpo", normalize_std=False), [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0])
    # leave-one-out: 1 - (2+3)/2, 2 - (1+3)/2, 3 - (1+2)/2 ; 0 - 3, 0 - 3, 6 - 0
    close(group_advantages(s, 3, "rloo"), [-1.5, 0.0, 1.5, -3.0, -3.0, 6.0])
    close(group_advantages(t([7.0, 7.0, 1.0, 1.0]), 2, "grpo"), [0.0, 0.0, 0.0, 0.0])  # std 0: no NaN


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(t([1.0, 2.0]), 1, "grpo")
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(t([1.0, 2.0, 3.0]), 2, "rloo")
    with pytest.raises(ValueError, match="unknown"):
        group_advantages(t([1.0, 2.0]), 2, "ppo")


# ---------------------------------------------------------------- losses


def test_policy_loss_clipped_and_unclipped():
    ratio = t([[1.5, 0.5, 1.5, 0.5]])
    lp = ratio.log().requires_grad_()
    adv = t([[1.0, 1.0, -1.0, -1.0]])
    loss, st = policy_loss(lp, torch.zeros_like(lp), adv, torch.ones_like(adv), clip_eps=0.2)
    # max(-A r, -A clip(r)): (-1.5,-1.2)->-1.2 clipped ; (-0.5,-0.8)->-0.5 ; (1.5,1.2)->1.5 ; (0.5,0.8)->0.8 clipped
    close(loss.detach(), [[-1.2, -0.5, 1.5, 0.8]])
    loss.sum().backward()
    close(lp.grad, [[0.0, -0.5, 1.5, 0.0]])  # d(-A r)/dlogp = -A r ; clipped tokens get no gradient
    close(st["clip_frac"], 0.5)
    # mean of r - 1 - log r: (0.0945349 + 0.1931472) / 2
    close(st["approx_kl"], 0.1438410)
    # masked last token, and (B,) advantages broadcast over tokens
    loss, st = policy_loss(ratio.log(), torch.zeros(1, 4), t([1.0]), t([[1, 1, 1, 0]]))
    close(loss, [[-1.2, -0.5, -1.2, 0.0]])
    close(st["clip_frac"], 2 / 3)


def test_policy_loss_clip_higher_and_dual_clip():
    ratio = t([[1.5, 0.5]])
    loss, _ = policy_loss(ratio.log(), torch.zeros(1, 2), t([[1.0, -1.0]]), torch.ones(1, 2), clip_eps_high=0.28)
    close(loss, [[-1.28, 0.8]])
    ratio = t([[5.0, 2.0, 5.0]])
    lp = ratio.log().requires_grad_()
    adv = t([[-1.0, -1.0, 1.0]])
    plain, _ = policy_loss(lp.detach(), torch.zeros(1, 3), adv, torch.ones(1, 3))
    close(plain, [[5.0, 2.0, -1.2]])
    loss, st = policy_loss(lp, torch.zeros(1, 3), adv, torch.ones(1, 3), dual_clip=3.0)
    close(loss.detach(), [[3.0, 2.0, -1.2]])  # A<0 loss capped at -c*A = 3
    loss.sum().backward()
    close(lp.grad, [[0.0, 2.0, 0.0]])
    close(st["dual_clip_frac"], 1 / 3)
    with pytest.raises(ValueError):
        policy_loss(lp, torch.zeros(1, 3), adv, torch.ones(1, 3), dual_clip=1.0)


def test_value_loss_clip():
    v = t([[1.5, 1.5, 1.1]]).requires_grad_()
    old = t([[1.0, 1.0, 1.0]])
    ret = t([[2.0, 1.0, 2.0]])
    m = torch.ones_like(old)
    # 0: 0.5*max(0.5^2, (1.2-2)^2=0.64)=0.32 ; 1: 0.5*max(0.25, 0.2^2)=0.125 ; 2: in range, 0.5*0.9^2=0.405
    loss, st = value_loss(v, old, ret, m, clip_eps=0.2)
    close(loss.detach(), [[0.32, 0.125, 0.405]])
    close(st["clip_frac"], 1 / 3)
    loss.sum().backward()
    close(v.grad, [[0.0, 0.5, -0.9]])  # clipped term is flat in v
    loss, _ = value_loss(v, old, ret, m, clip_eps=None)
    close(loss.detach(), [[0.125, 0.125, 0.405]])
    loss, _ = value_loss(v, old, ret, t([[1, 0, 1]]))
    close(loss.detach(), [[0.32, 0.0, 0.405]])


def test_entropy_and_logprobs():
    close(entropy_from_logits(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)))  # 1.9459101
    logits = t([[[0.0, float("-inf"), float("-inf")], [0.0, 0.0, float("-inf")]]]).requires_grad_()
    ent = entropy_from_logits(logits)
    close(ent.detach(), [[0.0, 0.6931472]])
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert entropy_from_logits(torch.zeros(1, 1, 4, dtype=torch.bfloat16)).dtype == torch.float32

    close(logprobs_from_logits(t([[[1000.0, 0.0], [1000.0, 0.0]]]), torch.tensor([[0, 1]])), [[0.0, -1000.0]])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    expected = torch.distributions.Categorical(logits=logits).log_prob(tokens)
    close(logprobs_from_logits(logits, tokens), expected)


# ---------------------------------------------------------------- aggregation

X = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 2.0, 0.0]]
M = [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]  # 4 + 1 + 2 + 0 = 7 tokens


def _loss_and_grad(rows, w, **kw):
    """Per-token loss x * w (w: (T,) parameter); returns (loss, dloss/dw)."""
    w = w.clone().requires_grad_()
    loss = aggregate_loss(t([X[i] for i in rows]) * w, t([M[i] for i in rows]), **kw)
    loss.backward()
    return loss.detach(), w.grad


def test_aggregate_modes():
    loss = t(X)
    mask = t(M)
    close(aggregate_loss(loss, mask, "token_mean"), 17 / 7)  # (10 + 5 + 2) / 7
    close(aggregate_loss(loss, mask, "seq_mean_token_mean"), 8.5 / 3)  # (2.5 + 5 + 1) / 3 rows with tokens
    close(aggregate_loss(loss, mask, "seq_mean_token_sum"), 17 / 3)  # (10 + 5 + 2) / 3
    z = torch.zeros_like(mask)
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        close(aggregate_loss(loss, z, mode), 0.0)
    close(aggregate_loss(loss, z, "token_mean", global_token_count=0), 0.0)
    with pytest.raises(ValueError):
        aggregate_loss(loss, mask, "mean")


def test_aggregate_micro_batches_match_full_batch():
    w = torch.ones(4)
    full, full_grad = _loss_and_grad(range(4), w)
    close(full, 17 / 7)
    close(full_grad, [1.0, 3 / 7, 3 / 7, 4 / 7])  # column sums of x*mask over 7 tokens

    # unequal micro-batches: 4 tokens and 3 tokens
    acc_loss, acc_grad = torch.zeros(()), torch.zeros(4)
    for rows in ([0], [1, 2, 3]):
        loss, grad = _loss_and_grad(rows, w, mode="token_mean", global_token_count=7.0)
        acc_loss, acc_grad = acc_loss + loss, acc_grad + grad
    assert torch.allclose(acc_loss, full) and torch.allclose(acc_grad, full_grad)

    # averaging local micro-batch means is what the global count fixes: (10/4 + 7/3) / 2 != 17/7
    naive = sum(_loss_and_grad(rows, w)[0] for rows in ([0], [1, 2, 3])) / 2
    assert not torch.allclose(naive, full)

    # seq modes via global_seq_count (3 non-empty rows)
    for mode in ("seq_mean_token_mean", "seq_mean_token_sum"):
        ref_loss, ref_grad = _loss_and_grad(range(4), w, mode=mode)
        parts = [_loss_and_grad(rows, w, mode=mode, global_seq_count=3) for rows in ([0, 3], [1, 2])]
        assert torch.allclose(sum(p[0] for p in parts), ref_loss)
        assert torch.allclose(sum(p[1] for p in parts), ref_grad)


def test_aggregate_data_parallel_ranks_match_full_batch():
    w = torch.tensor([0.5, -1.0, 2.0, 1.5])
    full, full_grad = _loss_and_grad(range(4), w)
    close(full, 12.5 / 7)  # masked row sums: 0.5 - 2 + 6 + 6 = 10.5 ; 5*0.5 = 2.5 ; 0.5 - 1 = -0.5
    world_size = 2
    ranks = {0: ([0], [1]), 1: ([2, 3],)}  # rank 0: 5 tokens in 2 micro-batches; rank 1: 2 tokens
    grads = []
    for micro_batches in ranks.values():
        p = w.clone().requires_grad_()
        for rows in micro_batches:
            x, m = t([X[i] for i in rows]), t([M[i] for i in rows])
            # caller contract: global count over all ranks, times world_size for DDP's gradient mean
            (aggregate_loss(x * p, m, "token_mean", global_token_count=7.0) * world_size).backward()
        grads.append(p.grad)
    ddp_grad = torch.stack(grads).mean(dim=0)  # what DDP's all-reduce(AVG) produces on every rank
    assert torch.allclose(ddp_grad, full_grad)
    close(full_grad, [1.0, 3 / 7, 3 / 7, 4 / 7])


# ---------------------------------------------------------------- NaN safety


def test_fully_masked_row_never_nan():
    B, T, V = 2, 3, 5
    mask = t([[1, 1, 0], [0, 0, 0]])
    pad = ~mask.bool()
    garbage = lambda x: x.masked_fill(pad, NAN)  # noqa: E731
    lp = garbage(t([[-1.0, -2.0, 0.0], [0.0, 0.0, 0.0]])).requires_grad_()
    old = garbage(t([[-1.1, -1.5, 0.0], [0.0, 0.0, 0.0]]))
    ref = garbage(t([[-0.9, -2.5, 0.0], [0.0, 0.0, 0.0]]))
    values = garbage(t([[0.3, 0.2, 0.0], [0.0, 0.0, 0.0]])).requires_grad_()
    scores = t([1.0, 2.0])

    outs = [masked_mean(lp, mask), masked_var(lp, mask), masked_whiten(lp, mask)]
    kl = kl_estimate(lp, ref, "k3", mask=mask)
    rewards = token_rewards(scores, kl.detach(), mask, kl_coef=0.1)
    adv, ret = gae(rewards, values.detach(), mask, gamma=1.0, lam=0.95)
    adv = masked_whiten(adv, mask)
    pl, pst = policy_loss(lp, old, adv, mask, dual_clip=3.0)
    vl, vst = value_loss(values, values.detach() + 0.1, ret, mask)
    ent = entropy_from_logits(torch.randn(B, T, V))
    outs += [kl, rewards, adv, ret, pl, vl, ent, *pst.values(), *vst.values()]
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        outs.append(aggregate_loss(pl, mask, mode))
        outs.append(aggregate_loss(pl[1:], mask[1:], mode))  # only the empty row
    total = aggregate_loss(pl, mask) + aggregate_loss(vl, mask) + kl.sum() + outs[2].sum()
    total.backward()
    for o in outs + [lp.grad, values.grad]:
        assert torch.isfinite(o).all(), o
    assert (adv[1] == 0).all() and (pl[1] == 0).all() and (lp.grad[1] == 0).all()


def test_split_rows_gives_each_rank_a_contiguous_shard_that_concatenates_back():
    import pickle

    from raystages.rl.batch import split_rows

    batch = {"input_ids": torch.arange(12).view(6, 2), "response_len": torch.tensor([1, 2, 3, 4, 5, 6])}
    shards = split_rows(batch, 3)
    assert [s["response_len"].tolist() for s in shards] == [[1, 2], [3, 4], [5, 6]]
    assert shards[1]["input_ids"].tolist() == [[4, 5], [6, 7]]  # the rows' full width kept
    assert all(torch.equal(torch.cat([s[k] for s in shards]), v) for k, v in batch.items())
    assert split_rows(batch, 1)[0].keys() == batch.keys()
    # What a rank receives (scatter_object_list pickles its shard) is its own rows' bytes,
    # not the whole batch's storage.
    big = {"input_ids": torch.zeros(64, 1024, dtype=torch.long)}
    assert len(pickle.dumps(split_rows(big, 4)[1])) < 1.1 * 64 * 1024 * 8 / 4


def test_health_kl_caps_one_outlier_token_but_not_broad_drift():
    from raystages.rl.batch import health

    def batch(log_ratio):  # (B, 3) per-token log pi - log ref on response tokens
        lr = torch.tensor(log_ratio)
        zeros = torch.zeros_like(lr)
        return {"mask": torch.ones_like(lr), "rollout_logprobs": zeros, "old_logprobs": zeros, "ref_logprobs": -lr,
                "entropy": zeros, "response_len": torch.full((lr.shape[0],), 3.0), "finished": torch.ones(lr.shape[0])}

    # One token with pi/ref = e^-7: k3 = e^7 - 1 - 7 ~ 1089 nats uncapped, 10 capped, over 64 rows.
    h = health(batch([[-7.0, 0.0, 0.0]] + [[0.0, 0.0, 0.0]] * 63))
    assert h["kl_ref"] == pytest.approx(10.0 / 64)
    assert h["kl_ref_k1"] == pytest.approx(-7.0 / 64)
    # Broad drift, every token below the cap: 3 tokens x (e^-0.5 - 1 + 0.5) = 3 x 0.1065307.
    assert health(batch([[0.5, 0.5, 0.5]] * 4))["kl_ref"] == pytest.approx(3 * 0.1065307, rel=1e-6)
