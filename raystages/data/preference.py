"""Preference rows for the reward model and DPO: row schemas -> tokenized (chosen, rejected) pairs.

Schemas (field names configurable in ``rm.fields``)::

    explicit prompt  {"prompt": str | messages, "chosen": str | messages, "rejected": ...}
    implicit prompt  {"chosen": str | messages, "rejected": ...}   (the prompt is the shared
                     prefix; Anthropic HH text "\\n\\nHuman: …\\n\\nAssistant: …" is parsed
                     into turns, other text is scored as it is)
    optional         "margin": how much more chosen should score (default 0)

Each side becomes one conversation rendered with the chat template (or raw text), and the
reward model scores its last token. Missing fields, empty responses, identical sides, a
side without an assistant turn and sequences over the length limit raise DataError.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np

from raystages.data.chat import _turns, check_messages, render, tokenize_conversation
from raystages.data.sources import DataError
from raystages.data import IGNORE

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh(text: str) -> list[dict] | None:
    """Turns of Anthropic HH text ("\\n\\nHuman: …\\n\\nAssistant: …"), or None for other text."""
    if not text.startswith("\n\nHuman:"):
        return None
    parts = _HH_TURN.split(text)
    return [{"role": "user" if who == "Human" else "assistant", "content": body}
            for who, body in zip(parts[1::2], parts[2::2])]


def _side(value: object, name: str, prompt: list[dict] | None) -> list[dict] | str:
    """One side of a pair as a full conversation (or raw text), validated."""
    if isinstance(value, str):
        if prompt is not None:
            conv = prompt + [{"role": "assistant", "content": value}]
        else:
            conv = parse_hh(value)
            if conv is None:
                if not value.strip():
                    raise DataError(f"empty response: field {name!r} is empty")
                return value
    elif value is None:
        raise DataError(f"missing field {name!r}")
    else:
        conv = (prompt or []) + check_messages(value, name)
    if conv[-1]["role"] != "assistant":
        raise DataError(f"field {name!r}: conversation has no assistant turn at the end")
    if not conv[-1]["content"].strip():
        raise DataError(f"empty response in field {name!r}")
    return conv


def pair_of(row: object, fields) -> tuple[list[dict] | str, list[dict] | str, float]:
    """``(chosen, rejected, margin)`` of one row, or DataError saying what is wrong."""
    if not isinstance(row, dict):
        raise DataError(f"expected an object, got {type(row).__name__}")
    for name in (fields.chosen_field, fields.rejected_field):
        if row.get(name) is None:
            raise DataError(f"missing field {name!r}")
    prompt = row.get(fields.prompt_field)
    prompt_turns = _turns(prompt, fields.prompt_field) if prompt is not None else None
    chosen = _side(row[fields.chosen_field], fields.chosen_field, prompt_turns)
    rejected = _side(row[fields.rejected_field], fields.rejected_field, prompt_turns)
    if chosen == rejected:
        raise DataError("chosen and rejected are identical")
    margin = row.get(fields.margin_field, 0.0)
    margin = 0.0 if margin is None else margin
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise DataError(f"field {fields.margin_field!r} must be a finite number, got {margin!r:.40}")
    return chosen, rejected, float(margin)


def tokenize_side(tokenizer, side: list[dict] | str) -> list[int]:
    """The token ids a reward model scores for one side: the conversation through the chat
    template, or raw text as it is. The one layout of training, RL, serving and reports."""
    text = side if isinstance(side, str) else render(tokenizer, side)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def scoring_side(prompt: str | None, response: str | list[dict]) -> list[dict] | str:
    """``response`` to ``prompt`` as a side of a pair: a string response is one assistant
    turn after the user's ``prompt`` (raw text when there is no prompt); a message list is
    the conversation itself, after ``prompt`` as a user turn when one is given."""
    head = [{"role": "user", "content": prompt}] if prompt is not None else []
    if isinstance(response, str):
        return head + [{"role": "assistant", "content": response}] if head else response
    return head + list(response)


def scoring_ids(tokenizer, prompt: str | None, response: str | list[dict]) -> list[int]:
    """Token ids a reward model scores for ``response`` to ``prompt`` (see scoring_side)."""
    return tokenize_side(tokenizer, scoring_side(prompt, response))


def rm_converter(fields, tokenizer, max_len: int) -> Callable[[object], dict]:
    """Row -> ``{"chosen_ids", "rejected_ids", "margin"}``; a side over ``max_len`` tokens
    is a bad row (cutting it would cut the response the reward is about)."""
    def convert(row: object) -> dict:
        chosen, rejected, margin = pair_of(row, fields)
        out = {"margin": margin}
        for name, side in (("chosen", chosen), ("rejected", rejected)):
            ids = tokenize_side(tokenizer, side)
            if len(ids) > max_len:
                raise DataError(f"too long: {name} has {len(ids)} tokens > optim.seq_len {max_len}")
            out[f"{name}_ids"] = ids
        if out["chosen_ids"] == out["rejected_ids"]:
            raise DataError("chosen and rejected are identical after tokenization")
        return out
    return convert


def dpo_converter(fields, tokenizer, max_len: int) -> Callable[[object], dict]:
    """Row -> ``{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "margin"}``:
    the same pairs and bad-row rules as :func:`rm_converter`, with labels on the response
    only: the last assistant turn of a conversation, or for raw text sides (implicit
    prompts that are not HH text) what follows the two sides' common token prefix."""
    def convert(row: object) -> dict:
        chosen, rejected, margin = pair_of(row, fields)
        out = {"margin": margin}
        for name, side in (("chosen", chosen), ("rejected", rejected)):
            if isinstance(side, str):
                ids = tokenize_side(tokenizer, side)
                labels = list(ids)
            else:
                ids, labels = tokenize_conversation(tokenizer, side, last_turn_only=True)
            if len(ids) > max_len:
                raise DataError(f"too long: {name} has {len(ids)} tokens > optim.seq_len {max_len}")
            out[f"{name}_ids"], out[f"{name}_labels"] = ids, labels
        if out["chosen_ids"] == out["rejected_ids"]:
            raise DataError("chosen and rejected are identical after tokenization")
        if isinstance(chosen, str) and isinstance(rejected, str):
            shared = next((i for i, (a, b) in enumerate(zip(out["chosen_ids"], out["rejected_ids"])) if a != b),
                          min(len(out["chosen_ids"]), len(out["rejected_ids"])))
            for name in ("chosen", "rejected"):
                out[f"{name}_labels"][:shared] = [IGNORE] * shared
        for name in ("chosen", "rejected"):
            if all(t == IGNORE for t in out[f"{name}_labels"][1:]):
                raise DataError(f"empty response: {name} has no token after the shared prompt")
        return out
    return convert


def pad_pairs(pairs: list[dict], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded pairs: ``chosen_ids``/``rejected_ids`` ``(N, L)`` int64, their lengths
    ``chosen_len``/``rejected_len`` ``(N,)``, ``margin`` ``(N,)`` float32, and, for
    :func:`dpo_converter`'s pairs, ``chosen_labels``/``rejected_labels`` ``(N, L)``
    padded with ``IGNORE``."""
    width = max(max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)
    out = {"margin": np.asarray([p["margin"] for p in pairs], dtype=np.float32)}
    for name in ("chosen", "rejected"):
        ids = np.full((len(pairs), width), pad_id, dtype=np.int64)
        for i, p in enumerate(pairs):
            ids[i, :len(p[f"{name}_ids"])] = p[f"{name}_ids"]
        out[f"{name}_ids"] = ids
        if f"{name}_labels" in pairs[0]:
            labels = np.full((len(pairs), width), IGNORE, dtype=np.int64)
            for i, p in enumerate(pairs):
                labels[i, :len(p[f"{name}_labels"])] = p[f"{name}_labels"]
            out[f"{name}_labels"] = labels
        out[f"{name}_len"] = np.asarray([len(p[f"{name}_ids"]) for p in pairs], dtype=np.int64)
    return out
