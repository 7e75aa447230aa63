"""Chat rows for SFT: row schemas -> conversations -> tokens with assistant-only labels.

Three row schemas, field names configurable (``sft.fields`` in the spec)::

    conversational      {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    prompt/completion   {"prompt": "...", "completion": "..."}
    instruction         {"instruction": "...", "input": "...", "output": "..."}
                        (or alpaca's seed form {"instruction", "instances": [{"input", "output"}]})

Conversations are rendered with the tokenizer's chat template and labelled by character
span: every token that starts inside an assistant turn's content *or its end-of-turn
marker* (``<|end|>``) is supervised; system/user turns, role headers, the newline after a
turn and padding get ``-100``. A bad row raises :class:`DataError` (the reader names
``file:row`` or skips and counts it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from raystages.data.sources import DataError, read_rows
from raystages.data import IGNORE

ROLES = ("system", "user", "assistant")


def check_messages(messages: object, name: str = "messages") -> list[dict]:
    """``messages`` as a list of ``{"role", "content"}`` dicts, or DataError saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"field {name!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{name}[{i}]: expected {{'role': one of {ROLES}, 'content': text}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _text(row: dict, field: str, required: bool = True) -> str:
    value = row.get(field)
    if value is None:
        if required:
            raise DataError(f"missing field {field!r}")
        return ""
    if not isinstance(value, str):
        raise DataError(f"field {field!r} is {type(value).__name__}, not text")
    return value


def _turns(prompt: object, name: str) -> list[dict]:
    """A prompt given as text (one user turn) or as a message list."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"field {name!r} is empty")
        return [{"role": "user", "content": prompt}]
    return check_messages(prompt, name)


def conversations_of(row: object, fields) -> list[list[dict]]:
    """The conversation(s) in one row (alpaca's ``instances`` form gives several).

    ``fields`` has ``format`` (auto/messages/prompt_completion/instruction) and the field
    names. Every conversation has a non-empty assistant turn, else DataError.
    """
    if not isinstance(row, dict):
        raise DataError(f"expected an object, got {type(row).__name__}")
    kind = fields.format
    if kind == "auto":
        if fields.messages_field in row:
            kind = "messages"
        elif fields.prompt_field in row or fields.completion_field in row:
            kind = "prompt_completion"
        elif fields.instruction_field in row:
            kind = "instruction"
        else:
            raise DataError(f"no {fields.messages_field!r}, {fields.prompt_field!r}/{fields.completion_field!r} "
                            f"or {fields.instruction_field!r} field (keys: {sorted(row)[:8]})")
    if kind == "messages":
        if fields.messages_field not in row:
            raise DataError(f"missing field {fields.messages_field!r}")
        convs = [check_messages(row[fields.messages_field], fields.messages_field)]
    elif kind == "prompt_completion":
        if fields.prompt_field not in row:
            raise DataError(f"missing field {fields.prompt_field!r}")
        completion = _text(row, fields.completion_field)
        convs = [_turns(row[fields.prompt_field], fields.prompt_field)
                 + [{"role": "assistant", "content": completion}]]
    else:
        instruction = _text(row, fields.instruction_field)
        if not instruction.strip():
            raise DataError(f"field {fields.instruction_field!r} is empty")
        instances = row.get("instances") if fields.output_field not in row else None
        if not isinstance(instances, list) or not instances:
            instances = [row]
        convs = []
        for inst in instances:
            if not isinstance(inst, dict):
                raise DataError(f"instances: expected objects, got {type(inst).__name__}")
            extra = _text(inst, fields.input_field, required=False)
            user = instruction + (f"\n\n{extra}" if extra.strip() else "")
            convs.append([{"role": "user", "content": user},
                          {"role": "assistant", "content": _text(inst, fields.output_field)}])
    for conv in convs:
        answers = [m for m in conv if m["role"] == "assistant"]
        if not answers:
            raise DataError("conversation has no assistant turn")
        if any(not m["content"].strip() for m in answers):
            raise DataError("empty response: an assistant turn has no content")
    return convs


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character span of each assistant
    turn: from after its header to the end of its end-of-turn marker (trailing whitespace
    the template adds after the marker is left out: generation stops before it)."""
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = render(tokenizer, messages[: i + 1])
        if i == 0:
            start = upto.find(m["content"].strip())
            # A template may set the reply off with spaces (ours does); byte-level BPE glues
            # them to the first word, so they belong to the reply's first token.
            while start > 0 and upto[start - 1] == " ":
                start -= 1
        else:
            start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        if not full.startswith(upto) or start < 0:
            raise ValueError("the chat template does not render a conversation as the concatenation "
                             "of its turns; assistant tokens cannot be located")
        spans.append((start, len(upto.rstrip())))
    return full, spans


def tokenize_conversation(tokenizer, messages: list[dict], last_turn_only: bool = False) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one conversation; labels are ``-100`` outside assistant spans
    (outside the last assistant turn with ``last_turn_only``: the response a preference is about)."""
    full, spans = assistant_spans(tokenizer, messages)
    if last_turn_only:
        spans = spans[-1:]
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if any(s <= a < e for s, e in spans) else IGNORE
              for t, (a, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def sft_converter(fields, tokenizer, max_len: int, truncate: bool) -> Callable[[object], list[dict]]:
    """Row -> list of ``{"input_ids", "labels"}`` examples; too long -> DataError (or cut
    to ``max_len`` when ``truncate``, still DataError if no supervised token survives)."""
    def convert(row: object) -> list[dict]:
        out = []
        for conv in conversations_of(row, fields):
            ids, labels = tokenize_conversation(tokenizer, conv)
            if len(ids) > max_len:
                if not truncate:
                    raise DataError(f"too long: {len(ids)} tokens > optim.seq_len {max_len} "
                                    "(raise optim.seq_len, or sft.truncate=true)")
                ids, labels = ids[:max_len], labels[:max_len]
            if all(t == IGNORE for t in labels[1:]):
                raise DataError(f"no supervised token within the first {max_len} tokens")
            out.append({"input_ids": ids, "labels": labels})
        return out
    return convert


def convert_items(items: list, convert: Callable, on_bad_row: str, label: str) -> tuple[list, list[str]]:
    """``read_rows`` for rows already in memory (the built-in task): ``(rows, skipped)``."""
    rows, skipped = [], []
    for i, item in enumerate(items):
        try:
            rows.append(convert(item))
        except DataError as e:
            if on_bad_row == "error":
                raise DataError(f"{label}:row {i + 1}: {e}") from None
            skipped.append(f"{label}:row {i + 1}: {e}")
    return rows, skipped


def load_split(data, convert: Callable, builtin_rows: Callable) -> tuple[list, list, list[str]]:
    """``(train, held-out, skipped notes)``: converted rows from ``data`` (a DataSpec).

    ``builtin_rows(split, n, seed, **lengths)`` makes the built-in task's rows. Without
    ``val_source``, the last ``val_fraction`` of the converted rows is held out.
    """
    if data.source == "builtin":
        b = data.builtin
        kw = {"seed": b.seed, "min_len": b.min_len, "max_len": b.max_len}
        train, s1 = convert_items(builtin_rows("train", b.num_train, **kw), convert, data.on_bad_row, "builtin:train")
        val, s2 = convert_items(builtin_rows("val", b.num_val, **kw), convert, data.on_bad_row, "builtin:val")
        return train, val, s1 + s2
    got = read_rows(data.source, convert, data.on_bad_row, data.max_rows, data.hub_split)
    if data.val_source:
        val = read_rows(data.val_source, convert, data.on_bad_row, data.max_rows, data.hub_split)
        return got.rows, val.rows, got.skipped + val.skipped
    if len(got.rows) < 2:
        raise DataError(f"{data.source}: {len(got.rows)} usable row(s); need 2 or more to hold some out")
    n_val = max(1, int(len(got.rows) * data.val_fraction))
    return got.rows[:-n_val], got.rows[-n_val:], got.skipped


def skip_reasons(notes: list[str]) -> dict[str, int]:
    """Counts per reason of ``"where: reason: detail"`` notes, for run summaries."""
    return dict(Counter(n.split(": ")[1] if n.count(": ") >= 1 else n for n in notes))


def pad_examples(examples: list[dict], pad_id: int) -> dict[str, np.ndarray]:
    """One example per row, right-padded to the longest: ``input_ids``, ``labels``,
    ``attention_mask``, each ``(N, L)`` int64."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=np.int64)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = e["input_ids"], e["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack_examples(examples: list[dict], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Several examples per ``seq_len`` block, in order (a new block when the next does
    not fit): ``input_ids``, ``labels``, ``position_ids``, each ``(N, seq_len)`` int64.

    Positions restart at 0 for each example; given ``position_ids`` and no attention mask,
    transformers builds a block-diagonal causal mask from those restarts, so no example
    attends to another. Each example's first label is ``-100``: it would be predicted
    from the previous example's last token.
    """
    blocks: list[list[dict]] = [[]]
    used = 0
    for e in examples:
        if used + len(e["input_ids"]) > seq_len and blocks[-1]:
            blocks.append([])
            used = 0
        blocks[-1].append(e)
        used += len(e["input_ids"])
    ids = np.full((len(blocks), seq_len), pad_id, dtype=np.int64)
    labels = np.full((len(blocks), seq_len), IGNORE, dtype=np.int64)
    pos = np.tile(np.arange(seq_len, dtype=np.int64), (len(blocks), 1))
    for b, block in enumerate(blocks):
        at = 0
        for e in block:
            n = len(e["input_ids"])
            ids[b, at:at + n], labels[b, at:at + n] = e["input_ids"], e["labels"]
            labels[b, at] = IGNORE
            pos[b, at:at + n] = np.arange(n)
            at += n
        pos[b, at:] = np.arange(seq_len - at)  # the padding tail is a segment of its own
    return {"input_ids": ids, "labels": labels, "position_ids": pos}
