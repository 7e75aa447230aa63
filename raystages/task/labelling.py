"""Built-in labelling tasks for the task heads, each with an exact oracle.

Classification: is a short letter sequence in alphabetical order? ::

    {"text": "b d d k", "label": "sorted"}      {"text": "d b k", "label": "unsorted"}

Half the rows are sorted by construction, so chance is 0.5 and a bag-of-letters model
cannot tell the classes apart: the head must compare neighbours.

Token classification: every maximal run of two or more equal letters is a ``RUN`` entity
(BIO tags), other letters are ``O``::

    {"tokens": ["a", "c", "c", "c", "b", "d", "d"], "tags": ["O", "B-RUN", "I-RUN", "I-RUN", "O", "B-RUN", "I-RUN"]}

A tag depends on both neighbours, and entity-level F1 (exact spans) gives no credit for
a span cut short. Both splits reserve the same hash-chosen tenth of texts for held-out rows
as the chat task (:attr:`raystages.task.problems.Problem.is_held_out`), so train and
held-out never share a text.
"""

from __future__ import annotations

import random
import zlib

from raystages.task.problems import ALPHABET
from raystages.task.splits import Split

SORTED, UNSORTED = "sorted", "unsorted"
_STREAM = {"classification": 11, "tagging": 12}


def is_sorted(letters: list[str]) -> bool:
    return all(a <= b for a, b in zip(letters, letters[1:]))


def run_tags(letters: list[str]) -> list[str]:
    """BIO tags marking each maximal run of >= 2 equal letters as one ``RUN`` entity."""
    tags = []
    for i, c in enumerate(letters):
        same_prev = i > 0 and letters[i - 1] == c
        same_next = i + 1 < len(letters) and letters[i + 1] == c
        tags.append("I-RUN" if same_prev else "B-RUN" if same_next else "O")
    return tags


def _held_out(text: str) -> bool:
    return zlib.crc32(text.encode()) % 10 == 0


def _rows(kind: str, split: Split, n: int, seed: int, make):
    rng = random.Random(seed * 1000 + _STREAM[kind])
    rows = []
    while len(rows) < n:
        letters = make(rng)
        if _held_out(" ".join(letters)) == (split == "val"):
            rows.append(letters)
    return rows


def classification_rows(split: Split, n: int, seed: int = 0, min_len: int = 3, max_len: int = 6) -> list[dict]:
    """``n`` rows ``{"text", "label"}``; about half ``sorted`` (by construction), labelled by the oracle."""
    def make(rng):
        letters = [rng.choice(ALPHABET) for _ in range(rng.randint(max(2, min_len), max_len))]
        return sorted(letters) if rng.random() < 0.5 else letters

    return [{"text": " ".join(ls), "label": SORTED if is_sorted(ls) else UNSORTED}
            for ls in _rows("classification", split, n, seed, make)]


def tagging_rows(split: Split, n: int, seed: int = 0, min_len: int = 3, max_len: int = 6) -> list[dict]:
    """``n`` rows ``{"tokens", "tags"}`` of 2x the task lengths, letters from a small
    alphabet so runs are common; tagged by :func:`run_tags`."""
    def make(rng):
        letters: list[str] = []
        while len(letters) < rng.randint(2 * min_len, 2 * max_len):
            letters += [rng.choice(ALPHABET[:6])] * rng.choice((1, 1, 2, 3))
        return letters[: 2 * max_len]

    return [{"tokens": ls, "tags": run_tags(ls)} for ls in _rows("tagging", split, n, seed, make)]
