"""Labelled rows for the task heads: reading, the label set, tokens with aligned labels
(a word's tag on its first piece, ``-100`` on its other pieces), BIO tag names checked.

Two row schemas, field names from ``sft.head``::

    classification         {"text": "...", "label": "positive" | 1}   (+ optional text pair)
    token_classification   {"tokens": ["Paris", "is", ...], "tags": ["B-location", "O", ...]}

Labels are names or int ids. The label set is ``sft.head.labels`` when given, else read off
the training rows (int ids: ``0..max``; names: sorted, ``O`` first); a held-out row with a
label outside it is an error naming its file and row, like every bad row (or skipped and
counted with ``data.on_bad_row=skip``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from raystages.data.chat import convert_items
from raystages.data.sources import DataError, read_rows
from raystages.data import IGNORE


def first_piece_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """One label per piece: the label of its word on the word's first piece, ``IGNORE`` on
    the word's other pieces and on special tokens (``word_ids`` entry None), as
    ``tokenizer(words, is_split_into_words=True).word_ids()`` gives them."""
    out, previous = [], None
    for w in word_ids:
        out.append(word_labels[w] if w is not None and w != previous else IGNORE)
        previous = w
    return out


def split_tag(tag: str) -> tuple[str, str]:
    """``("B" | "I" | "O", type)`` of a BIO tag; ValueError if it is not one."""
    if tag == "O":
        return "O", ""
    prefix, _, kind = tag.partition("-")
    if prefix not in ("B", "I") or not kind:
        raise ValueError(f"tag {tag!r} is not BIO (O, B-TYPE or I-TYPE)")
    return prefix, kind


def _label_value(value: object, name: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"field {name!r}: a label is a name or an int id, got {value!r:.40}")
    return value


def _text(row: dict, name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"missing text field {name!r}" if value is None else f"field {name!r} is not a non-empty text")
    return value


def row_reader(task: str, head) -> Callable[[object], tuple[tuple, object]]:
    """Row -> ``(inputs, label)``: ``((text, pair), label)`` or ``((words,), tags)``; DataError on a bad row."""
    def read(row: object):
        if not isinstance(row, dict):
            raise DataError(f"expected an object, got {type(row).__name__}")
        if task == "classification":
            if head.label_field not in row:
                raise DataError(f"missing label field {head.label_field!r}")
            pair = _text(row, head.text_pair_field) if head.text_pair_field else None
            return (_text(row, head.text_field), pair), _label_value(row[head.label_field], head.label_field)
        words, tags = row.get(head.tokens_field), row.get(head.tags_field)
        if words is None:
            raise DataError(f"no {head.tokens_field!r} field (task: token_classification needs a list of words)")
        if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
            raise DataError(f"field {head.tokens_field!r} must be a non-empty list of strings")
        if not isinstance(tags, list):
            raise DataError(f"missing list field {head.tags_field!r}" if tags is None
                            else f"field {head.tags_field!r} must be a list")
        if len(tags) != len(words):
            raise DataError(f"{len(tags)} tags for {len(words)} tokens")
        return (words,), [_label_value(t, head.tags_field) for t in tags]
    return read


def _values(label) -> list:
    return label if isinstance(label, list) else [label]


def label_names(rows: list, head, task: str) -> list[str]:
    """The label set, in id order, from ``head.labels`` or the training rows' labels."""
    if head.labels is not None:
        return list(head.labels)
    seen = {v for _, label in rows for v in _values(label)}
    if not seen:
        raise DataError("no labels in the training rows")
    if any(isinstance(v, int) for v in seen):
        if not all(isinstance(v, int) for v in seen):
            raise DataError(f"labels mix names and int ids: {sorted(map(str, seen))[:8]}")
        if min(seen) < 0:
            raise DataError(f"label ids must be >= 0, got {min(seen)}")
        n = max(max(seen) + 1, head.num_labels or 0)
        return [str(i) for i in range(n)]
    names = sorted(seen)
    if task == "token_classification" and "O" in names:
        names = ["O"] + [n for n in names if n != "O"]
    return names


def label_ids(names: list[str]) -> Callable[[object], int]:
    """A label -> its id: a name by its place in ``names``; an int id as itself (or by
    name when the names are ids); DataError if it is not one of them."""
    index = {n: i for i, n in enumerate(names)}

    def to_id(value) -> int:
        if isinstance(value, int) and str(value) not in index and 0 <= value < len(names):
            return value
        key = str(value) if isinstance(value, int) else value
        if key not in index:
            raise DataError(f"unknown label {value!r} (the labels are {names[:16]}"
                            + (" …" if len(names) > 16 else "") + ")")
        return index[key]
    return to_id


def map_labels(pair: tuple, to_id: Callable) -> tuple:
    """``(inputs, label or tags)`` with the label(s) turned into ids by ``to_id``."""
    inputs, label = pair
    return inputs, [to_id(v) for v in label] if isinstance(label, list) else to_id(label)


def _with_ids(read: Callable, to_id: Callable) -> Callable:
    return lambda row: map_labels(read(row), to_id)


@dataclass
class LabelledSplit:
    train: list  # [(inputs, label id or list of tag ids)]
    val: list
    labels: list[str]
    skipped: list[str]


def load_labelled(data, head, task: str, builtin_rows: Callable) -> LabelledSplit:
    """Read train and held-out rows with label ids; bad rows named (or skipped) by file:row.

    Without ``data.val_source`` the last ``data.val_fraction`` of the rows is held out and
    the label set comes from all of them; with it, from the training rows only, so a
    held-out label the model never saw is an error there.
    """
    read = row_reader(task, head)
    if data.source == "builtin":
        b = data.builtin
        kw = {"seed": b.seed, "min_len": b.min_len, "max_len": b.max_len}
        train, s1 = convert_items(builtin_rows("train", b.num_train, **kw), read, data.on_bad_row, "builtin:train")
        val, s2 = convert_items(builtin_rows("val", b.num_val, **kw), read, data.on_bad_row, "builtin:val")
        names = label_names(train, head, task)
        to_id = label_ids(names)
        val, s3 = convert_items(val, lambda pair: map_labels(pair, to_id), data.on_bad_row, "builtin:val")
        train, s4 = convert_items(train, lambda pair: map_labels(pair, to_id), data.on_bad_row, "builtin:train")
        return _checked(LabelledSplit(train, val, names, s1 + s2 + s3 + s4), head, task)
    fixed = head.labels is not None
    read_train = _with_ids(read, label_ids(list(head.labels))) if fixed else read
    got = read_rows(data.source, read_train, data.on_bad_row, data.max_rows, data.hub_split)
    rows, skipped = got.rows, list(got.skipped)
    names = list(head.labels) if fixed else label_names(rows, head, task)
    to_id = label_ids(names)
    if not fixed:
        rows = [map_labels(p, to_id) for p in rows]
    if data.val_source:
        val = read_rows(data.val_source, _with_ids(read, to_id), data.on_bad_row, data.max_rows, data.hub_split)
        return _checked(LabelledSplit(rows, val.rows, names, skipped + val.skipped), head, task)
    if len(rows) < 2:
        raise DataError(f"{data.source}: {len(rows)} usable row(s); need 2 or more to hold some out")
    n_val = max(1, int(len(rows) * data.val_fraction))
    return _checked(LabelledSplit(rows[:-n_val], rows[-n_val:], names, skipped), head, task)


def _checked(split: LabelledSplit, head, task: str) -> LabelledSplit:
    if task == "token_classification":
        for name in split.labels:
            try:
                split_tag(name)
            except ValueError as e:
                raise DataError(f"{e}; entity scores need BIO tag names: with int tag ids, "
                                "name them in id order in sft.head.labels") from None
    if head.num_labels is not None and head.num_labels != len(split.labels):
        raise DataError(f"sft.head.num_labels is {head.num_labels} but the data has {len(split.labels)} "
                        f"labels {split.labels[:16]}: fix num_labels or name them in sft.head.labels")
    if isinstance(head.class_weights, list) and len(head.class_weights) != len(split.labels):
        raise DataError(f"sft.head.class_weights has {len(head.class_weights)} numbers for the "
                        f"{len(split.labels)} labels {split.labels[:16]}")
    return split


def class_weights(head, train: list, num_labels: int) -> list[float] | None:
    """Per-label loss weights: ``head.class_weights`` as given, ``balanced`` (scikit-learn's
    ``n / (num_labels * count)``, counting words for tagging; an unseen label gets 0), or None."""
    if head.class_weights == "none":
        return None
    if isinstance(head.class_weights, list):
        return list(head.class_weights)
    counts = np.bincount([v for _, label in train for v in _values(label)], minlength=num_labels)
    n = counts.sum()
    return [float(n / (num_labels * c)) if c else 0.0 for c in counts]


def encode(tokenizer, split_rows: list, task: str, max_len: int) -> list[dict]:
    """``{"input_ids", "labels"}`` per row, cut to ``max_len`` tokens: one label per row
    (classification) or a label on each word's first piece, ``IGNORE`` elsewhere (tagging;
    words cut off by the limit lose their labels). A text pair also keeps the tokenizer's
    ``token_type_ids`` (BERT's segment ids: 1 on the second text), so the export reads a pair
    the way ``model(**tokenizer(a, b))`` feeds it."""
    out = []
    for inputs, label in split_rows:
        if task == "classification":
            text, pair = inputs
            enc = tokenizer(text, pair, truncation=True, max_length=max_len)
            out.append({"input_ids": enc["input_ids"], "labels": label})
            if pair is not None and "token_type_ids" in enc:
                out[-1]["token_type_ids"] = enc["token_type_ids"]
        else:
            enc = tokenizer(inputs[0], is_split_into_words=True, truncation=True, max_length=max_len)
            out.append({"input_ids": enc["input_ids"], "labels": first_piece_labels(enc.word_ids(), label)})
    return out


def pad_labelled(examples: list[dict], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded ``input_ids``, ``attention_mask`` ``(N, L)`` and ``labels``: ``(N,)``
    for classification, ``(N, L)`` padded with ``IGNORE`` for tagging; and ``token_type_ids``
    ``(N, L)`` (padded with 0) when the examples carry them."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=np.int64)
    per_token = isinstance(examples[0]["labels"], list)
    labels = (np.full((len(examples), width), IGNORE, dtype=np.int64) if per_token
              else np.zeros(len(examples), dtype=np.int64))
    segments = np.zeros((len(examples), width), dtype=np.int64) if "token_type_ids" in examples[0] else None
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], mask[i, :n] = e["input_ids"], 1
        if per_token:
            labels[i, :n] = e["labels"]
        else:
            labels[i] = e["labels"]
        if segments is not None:
            segments[i, :n] = e["token_type_ids"]
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return out if segments is None else {**out, "token_type_ids": segments}
