"""Deterministic splits of the built-in task, one per stage, each with train and held-out rows.

Every split is a pure function of ``(seed, n)``; stages use different seed streams so the
SFT data is not the pretraining data. Held-out rows come from the hash-reserved tenth of the
problem space (:attr:`Problem.is_held_out`), disjoint from every train split.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Literal

from raystages.task.problems import Problem, corrupt, sample_problem

Split = Literal["train", "val"]
_STREAM = {"pretrain": 1, "sft": 2, "rm": 3, "rl": 4}


def problems(stage: str, split: Split, n: int, seed: int = 0,
             min_len: int = 3, max_len: int = 6) -> Iterator[Problem]:
    rng = random.Random(seed * 1000 + _STREAM[stage])
    want_held_out = split == "val"
    made = 0
    while made < n:
        p = sample_problem(rng, min_len, max_len)
        if p.is_held_out == want_held_out:
            made += 1
            yield p


def pretrain_texts(split: Split, n_docs: int, seed: int = 0, lines_per_doc: int = 16,
                   noise: float = 0.3, **lengths) -> list[str]:
    """Plain-text documents of ``prompt = answer`` lines; ``noise`` of the answers are wrong.

    The wrong answers leave headroom: pretraining learns the format and the letters, SFT
    learns the skill from clean chat data, RL sharpens it against the oracle.
    """
    rng = random.Random(seed * 7919 + (split == "val"))
    ps = list(problems("pretrain", split, n_docs * lines_per_doc, seed, **lengths))
    docs = []
    for d in range(n_docs):
        lines = []
        for p in ps[d * lines_per_doc:(d + 1) * lines_per_doc]:
            ans = corrupt(p.answer, rng) if rng.random() < noise else p.answer
            lines.append(f"{p.prompt} = {ans}")
        docs.append("\n".join(lines))
    return docs


def sft_rows(split: Split, n: int, seed: int = 0, **lengths) -> list[dict]:
    return [{"messages": [{"role": "user", "content": p.prompt},
                          {"role": "assistant", "content": p.answer}]}
            for p in problems("sft", split, n, seed, **lengths)]


def preference_rows(split: Split, n: int, seed: int = 0, **lengths) -> list[dict]:
    """Pairs whose oracle preference is strict: chosen is right, rejected is a near miss.

    Some pairs compare two wrong answers (the closer one chosen), so the reward model must
    grade, not only detect, correctness.
    """
    from raystages.task.oracle import reward

    rng = random.Random(seed * 104729 + (split == "val"))
    rows = []
    for p in problems("rm", split, n, seed, **lengths):
        a = p.answer if rng.random() < 0.7 else corrupt(p.answer, rng)
        b = corrupt(p.answer, rng)
        ra, rb = reward(p.prompt, a), reward(p.prompt, b)
        if ra == rb:
            a, ra = p.answer, 1.0
        chosen, rejected = (a, b) if ra > rb else (b, a)
        rows.append({"prompt": p.prompt, "chosen": chosen, "rejected": rejected})
    return rows


def rl_prompts(split: Split, n: int, seed: int = 0, **lengths) -> list[dict]:
    return [{"prompt": p.prompt, "answer": p.answer}
            for p in problems("rl", split, n, seed, **lengths)]
