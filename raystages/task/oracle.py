"""The exact oracle of the built-in task: correctness and a dense reward in [0, 1]."""

from __future__ import annotations

import re

from raystages.task.problems import parse_prompt, solve

_LETTER = re.compile(r"\b[a-z]\b")


def _response_letters(response: str) -> list[str]:
    # Generation may run past the answer (a second line, a stray turn): judge the first line.
    first_line = response.strip().split("\n", 1)[0]
    return _LETTER.findall(first_line)


def reward(prompt: str, response: str) -> float:
    """Fraction of answer positions right, penalised by length mismatch.

    ``matches / max(len(response), len(answer))``: 1.0 exactly when the answer is right,
    strictly less for every wrong one, so it ranks answers the way exact match would while
    still giving RL a gradient on near misses. Raises ValueError on a non-task prompt.
    """
    problem = parse_prompt(prompt)
    if problem is None:
        raise ValueError(f"not a task prompt: {prompt!r}")
    want = solve(problem.op, problem.letters)
    got = _response_letters(response)
    matches = sum(a == b for a, b in zip(got, want))
    return matches / max(len(got), len(want))


def is_correct(prompt: str, response: str) -> bool:
    return reward(prompt, response) == 1.0
