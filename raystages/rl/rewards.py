"""Reward sources: the built-in oracle, any Python callable, a reward-model checkpoint.

Text sources (:class:`TextRewards`) run in the controller on decoded ``(prompt, response)``
strings. A reward model (:class:`RewardModelScorer`) runs on the learner workers, next to
the policy: either on the policy's own token ids (same tokenizer) or, with
``reward.retokenize``, on the text re-encoded with its own tokenizer and chat template.
Scores are normalised with the checkpoint's ``reward_stats.json`` (``reward_mean`` /
``reward_std``, as the reward-model stage writes them; older files say ``mean`` / ``std``)
when present, so weights mean the same across RMs.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

REWARD_STATS = "reward_stats.json"


def load_callable(ref: str) -> Callable[[str, str], float]:
    """``"module:function"`` -> the function."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


class TextRewards:
    """The spec's text-level sources: ``name -> fn(prompt, response) -> float``."""

    def __init__(self, sources) -> None:
        from raystages.task import reward as oracle

        self.fns: dict[str, tuple[Callable, float]] = {}
        for i, s in enumerate(sources):
            if s.kind == "oracle":
                self.fns["oracle"] = (oracle, s.weight)
            elif s.kind == "callable":
                self.fns[f"callable{i}:{s.ref}"] = (load_callable(s.ref), s.weight)

    def __call__(self, prompts: list[str], responses: list[str]) -> dict[str, list[float]]:
        out = {}
        for name, (fn, _) in self.fns.items():
            vals = []
            for p, r in zip(prompts, responses):
                v = fn(p, r)
                if not isinstance(v, (int, float)) or v != v:
                    raise ValueError(f"reward {name} returned {v!r} for prompt {p!r}: expected a number")
                vals.append(float(v))
            out[name] = vals
        return out


def oracle_scores(prompts: list[str], responses: list[str]) -> list[float] | None:
    """The built-in task's oracle reward, or None when a prompt is not a task prompt."""
    from raystages.task import reward
    from raystages.task.problems import parse_prompt

    if not all(parse_prompt(p) for p in prompts):
        return None
    return [reward(p, r) for p, r in zip(prompts, responses)]


def head_of(seq_model) -> torch.nn.Module:
    """The scalar head of an ``AutoModelForSequenceClassification`` (``score`` or ``classifier``)."""
    for name in ("score", "classifier", "v_head"):
        if hasattr(seq_model, name):
            return getattr(seq_model, name)
    raise ValueError(f"{type(seq_model).__name__} has no score/classifier head")


def token_values(seq_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head applied at every position: ``(B, L)`` ids/mask -> ``(B, L)`` fp32.

    A sequence-classification model scores a sequence at its last token; applying its head
    at every position gives a critic's per-token values (and the RM score at the end).
    """
    backbone = getattr(seq_model, seq_model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return head_of(seq_model)(hidden).squeeze(-1).float()


def last_token(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``values`` ``(B, L)`` at each row's last real token (right padding) -> ``(B,)``."""
    last = attention_mask.long().sum(dim=1).clamp(min=1) - 1
    return values.gather(1, last.unsqueeze(1)).squeeze(1)


def reward_stats(stats: dict) -> tuple[float, float]:
    """``(mean, std)`` from a ``reward_stats.json``: the RM stage's ``reward_mean`` /
    ``reward_std``, or the ``mean`` / ``std`` of files written before it."""
    mean = stats["reward_mean"] if "reward_mean" in stats else stats["mean"]
    std = stats["reward_std"] if "reward_std" in stats else stats["std"]
    return float(mean), max(float(std), 1e-6)


class RewardModelScorer:
    """A reward-model checkpoint, frozen, scoring right-padded ids or re-tokenised text.

    ``place`` puts the loaded model where it runs (the learner passes the engine's
    :func:`raystages.train.engine.frozen`, which shards it under ZeRO-3; every rank then
    scores together); default: a plain frozen copy on ``device``.
    """

    def __init__(self, path: str, retokenize: bool, normalize: bool, device="cpu",
                 place: Callable | None = None) -> None:
        from transformers import AutoModelForSequenceClassification

        from raystages.models import load_tokenizer

        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, use_safetensors=True, dtype=torch.float32)
        if place is None:
            model = model.to(device).eval().requires_grad_(False)
        else:
            model = place(model)
        # A ZeRO-3 engine wraps the model; its hooks gather each layer however it is called.
        self.model = getattr(model, "module", model)
        self.placed = model  # keeps the engine alive
        self.device = device
        self.tok = load_tokenizer(path) if retokenize else None
        self.mean, self.std = 0.0, 1.0
        stats = Path(path) / REWARD_STATS
        if normalize and stats.is_file():
            self.mean, self.std = reward_stats(json.loads(stats.read_text()))

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Right-padded ``(B, L)`` prompt+response ids in the RM's vocabulary -> ``(B,)``."""
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        raw = last_token(token_values(self.model, ids, mask), mask)
        return ((raw - self.mean) / self.std).cpu()

    @torch.no_grad()
    def score_texts(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Score ``(prompt, response)`` pairs re-encoded with the RM's own chat template, laid
        out as the RM stage trained on them."""
        from raystages.data.preference import scoring_ids
        from raystages.models import padded

        seqs = [scoring_ids(self.tok, p, r) for p, r in zip(prompts, responses)]
        return self.score_ids(*padded(seqs, self.tok.pad_token_id))
