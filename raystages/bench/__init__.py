"""``raystages bench <what>``: side-by-side measurements in one invocation, printed as ratios.

Each module ``raystages.bench.<what>`` has ``run(overrides: list[str]) -> dict``.
"""

from __future__ import annotations

import importlib

BENCHES = ("pretrain", "data", "sft", "rm", "dpo", "rl", "memory", "serve", "tasks")


def run_bench(what: str, overrides: list[str]) -> dict:
    return importlib.import_module(f"raystages.bench.{what}").run(overrides)
