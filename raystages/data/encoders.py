"""What one token-cache record is, per kind of data: the rows -> records step of a cache fill.

A fill's writer tasks (:mod:`raystages.data.shards`) read rows, ``convert`` each (a bad row
raises :class:`DataError`) and hand the converted items to ``encode``, which yields
``(split, record)``: a record is a dict of equal-width int arrays, one parquet row of the
cache. Two kinds, chosen by ``encoding["kind"]`` (the description that also goes into the
cache key, so a change of any of its fields is a different cache):

``text``  pretraining: documents -> packed ``input_ids`` blocks of ``seq_len`` (GPT-style, or
          RoBERTa's FULL-SENTENCES for a masked LM); a held-out unit keeps every n-th block.
``chat``  chat SFT: rows -> examples with assistant-only labels (:mod:`raystages.data.chat`),
          each a padded ``input_ids``/``labels``/``attention_mask`` row of ``seq_len``, or
          with ``packing`` several per ``input_ids``/``labels``/``position_ids`` block. A
          held-out unit keeps every n-th *example* (padded, one per row), before packing.

Padding to ``seq_len`` rather than to the longest row keeps every record the same width, so
shards concatenate; the SFT loss drops the columns that are padding in a whole micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from raystages.data import IGNORE


def encoder_for(encoding: dict, tokenizer):
    kinds = {"text": TextBlocks, "chat": ChatExamples}
    return kinds[encoding["kind"]](encoding, tokenizer)


class TextBlocks:
    """Pretraining text packed into blocks (:class:`raystages.data.packing.Packer`)."""

    def __init__(self, encoding: dict, tokenizer):
        from raystages.data.packing import Packer, special_ids
        from raystages.data.sources import text_of

        self.tokenizer = tokenizer
        self.convert = text_of(encoding["text_field"])
        eos, bos = special_ids(tokenizer, encoding["objective"])
        self.packer = Packer(eos, encoding["seq_len"], bos)
        self.blocks = 0  # counted over the unit: the held-out rule is every n-th block
        self.counts: dict[str, int] = {}

    def encode(self, docs: list[str], split: str, every: int) -> Iterator[tuple[str, dict]]:
        ids = self.tokenizer(docs, add_special_tokens=False)["input_ids"]
        for block in self.packer.feed(ids):
            out = split
            if split == "holdout":
                out = "val" if self.blocks % every == 0 else "train"
            self.blocks += 1
            yield out, {"input_ids": block}

    def close(self) -> Iterator[tuple[str, dict]]:
        return iter(())  # the final partial block is dropped, as pack() does


class ChatExamples:
    """Chat rows as supervised examples: padded rows, or packed blocks with ``packing``."""

    def __init__(self, encoding: dict, tokenizer):
        from raystages.data.chat import ExamplePacker, sft_converter
        from raystages.spec import ChatFieldsSpec

        self.seq_len, self.pad = encoding["seq_len"], tokenizer.pad_token_id
        convert = sft_converter(ChatFieldsSpec(**encoding["fields"]), tokenizer, self.seq_len, encoding["truncate"])
        self.convert = convert  # a row -> its list of examples (alpaca's instances: several)
        self.packer = ExamplePacker(self.seq_len, self.pad) if encoding["packing"] else None
        self.examples = 0  # counted over the unit: the held-out rule is every n-th example
        self.counts = {"train_examples": 0, "val_examples": 0, "train_tokens": 0, "train_supervised_tokens": 0}

    def encode(self, rows: list[list[dict]], split: str, every: int) -> Iterator[tuple[str, dict]]:
        for example in (e for row in rows for e in row):
            out = split
            if split == "holdout":
                out = "val" if self.examples % every == 0 else "train"
            self.examples += 1
            self.counts[f"{out}_examples"] += 1
            if out == "train":
                self.counts["train_tokens"] += len(example["input_ids"])
                self.counts["train_supervised_tokens"] += sum(t != IGNORE for t in example["labels"][1:])
            if out == "train" and self.packer is not None:
                yield from (("train", block) for block in self.packer.feed([example]))
            else:
                yield out, padded(example, self.seq_len, self.pad)

    def close(self) -> Iterator[tuple[str, dict]]:
        return (("train", block) for block in (self.packer.flush() if self.packer else []))


def padded(example: dict, width: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example right-padded to ``width``: ``input_ids``, ``labels``, ``attention_mask``."""
    n = len(example["input_ids"])
    ids = np.full(width, pad_id, dtype=np.int64)
    labels = np.full(width, IGNORE, dtype=np.int64)
    mask = np.zeros(width, dtype=np.int64)
    ids[:n], labels[:n], mask[:n] = example["input_ids"], example["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
