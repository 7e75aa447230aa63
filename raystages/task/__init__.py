"""The built-in synthetic task: letter puzzles with an exact oracle.

A problem asks to ``sort`` or ``reverse`` a short list of letters::

    user:      sort: d a c b
    assistant: a b c d

One generator feeds all four stages (see :mod:`raystages.task.splits`): a plain-text corpus
for pretraining (with some answers deliberately wrong, so pretraining learns the domain but
not the skill), chat examples for SFT, chosen/rejected pairs for the reward model, and
prompts for RL, where :func:`raystages.task.oracle.reward` gives partial credit per letter.
"""

from raystages.task.oracle import is_correct, reward
from raystages.task.problems import Problem, parse_prompt, sample_problem

__all__ = ["Problem", "is_correct", "parse_prompt", "reward", "sample_problem"]
