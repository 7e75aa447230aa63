"""Tokenisation and packing of plain text into fixed-length blocks (Ray Data).

Causal LMs get GPT-style blocks (documents joined by eos). Masked LMs get RoBERTa's
FULL-SENTENCES blocks (Liu et al. 2019, §4.2): each block opens with [CLS] and documents
are joined by [SEP], so the encoder sees the same markers it sees when fine-tuned.
"""

from __future__ import annotations

import numpy as np


def pack(token_lists: list[list[int]], eos_id: int, seq_len: int, bos_id: int | None = None) -> np.ndarray:
    """Concatenate documents, each followed by ``eos_id``, and cut into ``(n, seq_len)`` blocks.

    The tail shorter than ``seq_len`` is dropped (per Ray Data batch, so at most one partial
    block per batch is lost). Documents may straddle blocks: plain GPT-style packing. With
    ``bos_id`` every block starts with it, followed by ``seq_len - 1`` tokens of the stream.
    """
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        flat.append(eos_id)
    width = seq_len if bos_id is None else seq_len - 1
    n = len(flat) // width
    blocks = np.asarray(flat[: n * width], dtype=np.int64).reshape(n, width)
    if bos_id is not None:
        blocks = np.concatenate([np.full((n, 1), bos_id, dtype=np.int64), blocks], axis=1)
    return blocks


class Packer:
    """:func:`pack` over a stream: documents fed in any batches give the blocks that one
    ``pack`` of all of them gives (only the final partial block is dropped), holding no
    more than one batch and a partial block at a time."""

    def __init__(self, eos_id: int, seq_len: int, bos_id: int | None = None):
        self.eos, self.bos = eos_id, bos_id
        self.width = seq_len if bos_id is None else seq_len - 1
        self.tail: list[int] = []

    def feed(self, token_lists: list[list[int]]) -> np.ndarray:
        flat = self.tail
        for ids in token_lists:
            flat.extend(ids)
            flat.append(self.eos)
        n = len(flat) // self.width
        blocks = np.asarray(flat[: n * self.width], dtype=np.int64).reshape(n, self.width)
        self.tail = flat[n * self.width:]
        if self.bos is not None:
            blocks = np.concatenate([np.full((n, 1), self.bos, dtype=np.int64), blocks], axis=1)
        return blocks


def special_ids(tokenizer, objective: str) -> tuple[int, int | None]:
    """(separator, block opener): eos and none for causal LMs, [SEP] and [CLS] for MLM."""
    if objective == "mlm":
        return tokenizer.sep_token_id, tokenizer.cls_token_id
    return tokenizer.eos_token_id, None
