"""Problems of the built-in task: sampling, rendering, parsing, corrupting."""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass

OPS = ("sort", "reverse")
ALPHABET = "abcdefghijklmnop"
_PROMPT = re.compile(r"^\s*(sort|reverse):((?:\s+[a-z])+)\s*$")


@dataclass(frozen=True)
class Problem:
    op: str
    letters: tuple[str, ...]

    @property
    def prompt(self) -> str:
        return f"{self.op}: {' '.join(self.letters)}"

    @property
    def answer(self) -> str:
        return " ".join(solve(self.op, self.letters))

    @property
    def is_held_out(self) -> bool:
        """One problem in ten, by a stable hash of its text, is reserved for evaluation,
        so train and held-out splits never share a problem whatever their sizes."""
        return zlib.crc32(self.prompt.encode()) % 10 == 0


def solve(op: str, letters: tuple[str, ...] | list[str]) -> list[str]:
    return sorted(letters) if op == "sort" else list(reversed(letters))


def sample_problem(rng: random.Random, min_len: int = 3, max_len: int = 6) -> Problem:
    n = rng.randint(min_len, max_len)
    return Problem(rng.choice(OPS), tuple(rng.choice(ALPHABET) for _ in range(n)))


def parse_prompt(prompt: str) -> Problem | None:
    """The problem a prompt asks, or None if the text is not a task prompt."""
    m = _PROMPT.match(prompt)
    return Problem(m.group(1), tuple(m.group(2).split())) if m else None


def corrupt(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: two letters swapped, one dropped, one added or replaced.

    Always differs from ``answer`` (retries until it does), so it is a valid "rejected".
    """
    letters = answer.split()
    for _ in range(20):
        out = list(letters)
        kind = rng.randrange(4)
        if kind == 0 and len(out) >= 2:
            i, j = rng.sample(range(len(out)), 2)
            out[i], out[j] = out[j], out[i]
        elif kind == 1 and len(out) >= 2:
            del out[rng.randrange(len(out))]
        elif kind == 2:
            out.insert(rng.randrange(len(out) + 1), rng.choice(ALPHABET))
        else:
            out[rng.randrange(len(out))] = rng.choice(ALPHABET)
        if out != letters:
            return " ".join(out)
    return " ".join(letters + ["a"])
