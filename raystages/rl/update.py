"""What a learner rank computes: the forward pass over a batch shard and the PPO update.

Called by :class:`raystages.rl.learner.Learner` (``w``: reads ``spec``, ``rank``, ``world``,
``device``, ``policy``, ``reference()``, ``critic``, ``rm``), on every Ray Train worker.
Shapes as in :mod:`raystages.rl.batch`: ``(B, L)`` ids/mask, ``(B, L - 1)`` per-token tensors.
"""

from __future__ import annotations

import torch

from raystages.rl.algos import KL_TOKEN_CAP, aggregate_loss, entropy_from_logits, kl_estimate, logprobs_from_logits, policy_loss, value_loss


def _trim(batch: dict, rows) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The rows' ids/mask cut to their longest real length (less compute on short rows)."""
    attn = batch["attention_mask"][rows]
    width = int(attn.sum(1).max())
    return batch["input_ids"][rows][:, :width], attn[:, :width], width


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def logprobs_of(w, model, ids, attn):
    """Log-probs ``(b, w-1)`` of the tokens under ``softmax(logits / T)``, and the logits."""
    logits = model(input_ids=ids.to(w.device), attention_mask=attn.to(w.device)).logits[:, :-1].float()
    t = w.spec.rollout.temperature
    if t > 0:
        logits = logits / t
    return logprobs_from_logits(logits, ids[:, 1:].to(w.device)), logits


@torch.no_grad()
def forward_batch(w, batch: dict) -> dict:
    """For this rank's rows ``batch`` (``(b, L)``): old/ref log-probs, entropy, values, RM scores."""
    B, L = batch["input_ids"].shape
    rows = torch.arange(B)
    out = {k: [] for k in ("old_logprobs", "ref_logprobs", "entropy", "values", "rm_scores")}
    w.policy.eval()
    for micro in rows.split(w.spec.optim.micro_batch_size):
        ids, attn, width = _trim(batch, micro)
        lp, logits = logprobs_of(w, w.policy, ids, attn)
        out["old_logprobs"].append(_pad_to(lp.cpu(), L - 1))
        out["entropy"].append(_pad_to(entropy_from_logits(logits).cpu(), L - 1))
        with w.reference() as ref:
            out["ref_logprobs"].append(_pad_to(logprobs_of(w, ref, ids, attn)[0].cpu(), L - 1))
        if w.critic is not None:
            w.critic.eval()
            v = w.critic(ids.to(w.device), attn.to(w.device))[:, :-1]
            out["values"].append(_pad_to(v.cpu(), L - 1))
        if w.rm is not None and not w.spec.reward.retokenize:
            out["rm_scores"].append(w.rm.score_ids(ids, attn))
    return {k: torch.cat(v) for k, v in out.items() if v}


def ppo_update(w, batch: dict, kl_coef: float, iteration: int) -> dict:
    """PPO epochs over seeded mini-batches of this rank's rows ``batch`` (``(b, ...)``, its
    shard of the ``B = b * world`` rows); returns token-weighted means over all ranks.

    Each epoch, every rank permutes its own rows (seeded by run seed, iteration, epoch and
    rank) and cuts them into ``B / mini_batch_size`` pieces: optimizer step ``k`` trains on
    piece ``k`` of every rank, ``mini_batch_size`` rows in all. One all-reduce per epoch
    gives each mini-batch's token and sequence counts over all ranks.
    """
    import torch.distributed as dist

    spec, a = w.spec, w.spec.algo
    placement, kind = spec.kl.resolved(a.name)
    b = batch["input_ids"].shape[0]
    steps_per_epoch = b * w.world // a.mini_batch_size
    sums: dict[str, float] = {}

    def add(name, value, weight):
        sums[name] = sums.get(name, 0.0) + float(value) * weight

    w.policy.train()
    if w.critic is not None:
        w.critic.train()
    for epoch in range(a.ppo_epochs):
        g = torch.Generator().manual_seed(spec.run.seed * 100003 + iteration * 101 + epoch + 7919 * w.rank)
        pieces = torch.randperm(b, generator=g).tensor_split(steps_per_epoch)
        # Token/sequence counts of each whole mini-batch over all ranks. Each micro-batch
        # loss is divided by them and multiplied by the world size (DeepSpeed averages
        # gradients over ranks): the summed gradient is exactly the mini-batch's (see
        # aggregate_loss).
        counts = torch.tensor([[float(batch["mask"][p].sum()), float((batch["mask"][p].sum(1) > 0).sum())]
                               for p in pieces], dtype=torch.float64)
        if w.world > 1:
            dist.all_reduce(counts)
        for mine, (n_tok, n_seq) in zip(pieces, counts.tolist()):
            for micro in mine.split(spec.optim.micro_batch_size):
                ids, attn, width = _trim(batch, micro)
                m = batch["mask"][micro][:, :width - 1].to(w.device)
                take = lambda k: batch[k][micro][:, :width - 1].to(w.device)  # noqa: E731
                agg = lambda x: aggregate_loss(x, m, a.loss_agg, n_tok, n_seq) * w.world  # noqa: E731
                lp, logits = logprobs_of(w, w.policy, ids, attn)
                pl, st = policy_loss(lp, take("old_logprobs"), take("advantages"), m, a.clip_eps,
                                     a.clip_eps_high, a.dual_clip)
                loss = agg(pl)
                local = m.sum().item()
                if placement == "loss":
                    kl = kl_estimate(lp, take("ref_logprobs"), kind, m, cap=KL_TOKEN_CAP)
                    loss = loss + kl_coef * agg(kl)
                    add("kl_loss", (kl.sum() / max(local, 1)).item(), local)
                ent = entropy_from_logits(logits)
                if a.entropy_coef:
                    loss = loss - a.entropy_coef * agg(ent)
                w.policy.backward(loss, scale_wrt_gas=False)
                w.policy.step()
                add("policy_loss", loss.item() / w.world, 1.0)
                for k, v in st.items():
                    add(k, v.item(), local)
                add("update_entropy", ((ent * m).sum() / max(local, 1)).item(), local)
                add("tokens", local, 1.0)
                if w.critic is not None:
                    v = w.critic(ids.to(w.device), attn.to(w.device))[:, :-1]
                    vl, vst = value_loss(v, take("values"), take("returns"), m, a.value_clip)
                    vloss = aggregate_loss(vl, m, "token_mean", n_tok) * w.world
                    w.critic.backward(vloss, scale_wrt_gas=False)
                    w.critic.step()
                    add("value_loss", vloss.item() / w.world, 1.0)
                    add("value_clip_frac", vst["clip_frac"].item(), local)
    names = sorted(sums)
    t = torch.tensor([sums[n] for n in names], dtype=torch.float64)
    dist.all_reduce(t)
    total = dict(zip(names, t.tolist()))
    steps = a.ppo_epochs * steps_per_epoch
    out = {}
    for n, v in total.items():
        if n in ("policy_loss", "value_loss"):
            out[n] = v / steps  # summed over micro-batches and ranks = the mini-batch loss
        elif n != "tokens":
            out[n] = v / max(total["tokens"], 1)
    out["lr"] = w.policy.get_lr()[0]
    return out
