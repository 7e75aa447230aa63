"""Between the pure math and the workers: rollouts -> padded tensors -> advantages.

Layout of a batch (a dict of CPU tensors, ``B`` responses, ``L`` = longest prompt+response):

* ``input_ids``, ``attention_mask``: ``(B, L)``, each row ``prompt + response`` right-padded,
  so positions start at 0 exactly as in the rollout engine;
* per-token tensors are ``(B, L - 1)``: column ``t`` is about the token at ``t + 1``,
  predicted from position ``t`` (``logits[:, :-1]``). ``mask`` is 1 on response tokens, so
  the prompt is a masked prefix — the masked-gap-aware math in
  :mod:`raystages.rl.advantages` treats it as "not a step";
* ``rollout_logprobs`` (what the engine reported), and once the learner has run
  ``old_logprobs``, ``ref_logprobs``, ``entropy``, ``values`` (PPO).
"""

from __future__ import annotations

import math

import torch

from raystages.rl.algos import KL_TOKEN_CAP, gae, group_advantages, kl_estimate, masked_mean, masked_sum, masked_whiten, token_rewards
from raystages.rl.rollout import Generation


def collate(gens: list[Generation], pad_id: int) -> dict[str, torch.Tensor]:
    B = len(gens)
    L = max(len(g.prompt_ids) + len(g.response_ids) for g in gens)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L - 1))
    lps = torch.zeros((B, L - 1))
    for i, g in enumerate(gens):
        p, r = len(g.prompt_ids), len(g.response_ids)
        ids[i, :p + r] = torch.tensor(g.prompt_ids + g.response_ids)
        attn[i, :p + r] = 1
        mask[i, p - 1:p - 1 + r] = 1
        lps[i, p - 1:p - 1 + r] = torch.tensor(g.logprobs, dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": attn, "mask": mask, "rollout_logprobs": lps,
            "response_len": mask.sum(1), "finished": torch.tensor([g.finished for g in gens])}


class RunningMoments:
    """Running mean/std of sequence rewards across iterations (Chan et al. parallel update)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        n, mean, var = x.numel(), x.mean().item(), x.var(unbiased=False).item()
        total = self.n + n
        delta = mean - self.mean
        self.m2 += var * n + delta ** 2 * self.n * n / total
        self.mean += delta * n / total
        self.n = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / max(self.n - 1, 1)) if self.n > 1 else 1.0


def split_rows(batch: dict[str, torch.Tensor], world: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` cut into ``world`` contiguous row shards, rank ``r``'s at index ``r``: every
    tensor's first dimension is the batch's rows (``(B, ...)`` -> ``(B / world, ...)`` each;
    ``B`` divides evenly, as the spec guarantees). The widths stay the whole batch's, so the
    shards concatenate back. Each shard owns its storage: a pickled view would carry the
    whole batch to every rank."""
    return [dict(zip(batch, rows)) for rows in zip(*((r.clone() for r in v.tensor_split(world))
                                                       for v in batch.values()))]


def shape_scores(scores: torch.Tensor, algo, moments: RunningMoments) -> torch.Tensor:
    """Sequence rewards ``(B,)`` after the spec's normalisation and clipping."""
    s = scores.float()
    if algo.reward_norm == "batch":
        s = (s - s.mean()) / (s.std() + 1e-6)
    elif algo.reward_norm == "running":
        moments.update(s)
        s = (s - moments.mean) / (moments.std + 1e-6)
    if algo.reward_clip is not None:
        s = s.clamp(-algo.reward_clip, algo.reward_clip)
    return s


def advantages(spec, batch: dict, scores: torch.Tensor, kl_coef: float) -> dict[str, torch.Tensor]:
    """Advantages ``(B, L-1)`` (and PPO ``returns``) from shaped sequence ``scores`` ``(B,)``.

    PPO: per-token rewards (score at the last response token, minus ``kl_coef * kl`` on
    every token when the KL sits in the reward), then GAE with the critic's values.
    GRPO/RLOO: group-relative sequence advantages (with the sequence KL subtracted from the
    score when it sits in the reward), broadcast over the response tokens.
    """
    a, mask = spec.algo, batch["mask"]
    placement, kind = spec.kl.resolved(a.name)
    kl = kl_estimate(batch["old_logprobs"], batch["ref_logprobs"], kind, mask, cap=KL_TOKEN_CAP)
    coef = kl_coef if placement == "reward" else 0.0
    out = {}
    if a.name == "ppo":
        rewards = token_rewards(scores, kl, mask, coef)
        adv, ret = gae(rewards, batch["values"], mask, a.gamma, a.lam)
        out["returns"] = ret
    else:
        seq = scores - coef * masked_sum(kl, mask, dim=1)
        adv = group_advantages(seq, a.group_size, a.name, a.grpo_std_norm)[:, None] * mask
    if a.whiten_advantages and a.name != "grpo":
        adv = masked_whiten(adv, mask)
    out["advantages"] = adv
    return out


def health(batch: dict) -> dict[str, float]:
    """On-policy health of a scored batch: rollout/learner log-prob gap, KL to the
    reference (per sequence: k3 with each token's term capped at ``KL_TOKEN_CAP``, summed
    over tokens; ``kl_ref_k1`` uncapped), entropy, lengths."""
    m = batch["mask"]
    gap = (batch["rollout_logprobs"] - batch["old_logprobs"]).abs()
    kl_tok = kl_estimate(batch["old_logprobs"], batch["ref_logprobs"], "k3", m, cap=KL_TOKEN_CAP)
    kl_seq = masked_sum(kl_tok, m, dim=1)
    out = {
        "logprob_gap_mean": masked_mean(gap, m).item(),
        "logprob_gap_max": (gap * m).max().item(),
        "kl_ref": kl_seq.mean().item(),
        "kl_ref_k1": masked_sum(batch["old_logprobs"] - batch["ref_logprobs"], m, dim=1).mean().item(),
        "entropy": masked_mean(batch["entropy"], m).item(),
        "response_len": batch["response_len"].mean().item(),
        "response_len_max": batch["response_len"].max().item(),
        "truncated_frac": 1.0 - batch["finished"].float().mean().item(),
    }
    if "values" in batch and "returns" in batch:
        err = (batch["values"] - batch["returns"]).square()
        out["value_error"] = masked_mean(err, m).item()
        var_ret = masked_mean((batch["returns"] - masked_mean(batch["returns"], m)).square(), m)
        out["explained_var"] = (1 - masked_mean(err, m) / (var_ret + 1e-8)).item()
    return out
