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


class TokenizeAndPack:
    """Ray Data ``map_batches`` callable: ``{"text"}`` rows in, ``{"input_ids"}`` blocks out
    (``[CLS] doc [SEP] doc [SEP] …`` blocks for ``objective="mlm"``)."""

    def __init__(self, tokenizer_dir: str, seq_len: int, objective: str = "causal"):
        from raystages.models import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.seq_len = seq_len
        tok = self.tokenizer
        self.eos, self.bos = ((tok.sep_token_id, tok.cls_token_id) if objective == "mlm"
                              else (tok.eos_token_id, None))

    def __call__(self, batch: dict) -> dict:
        ids = self.tokenizer(list(batch["text"]), add_special_tokens=False)["input_ids"]
        return {"input_ids": pack(ids, self.eos, self.seq_len, self.bos)}


def packed_dataset(texts: list[str], tokenizer_dir: str, seq_len: int, seed: int | None,
                   objective: str = "causal"):
    """A materialised Ray Dataset of packed blocks, shuffled once with ``seed`` (None: keep order).

    Materialised before the trainer starts: on a 2-CPU machine, streaming Ray Data tasks
    beside the training workers can starve for CPUs.
    """
    import ray.data

    ds = ray.data.from_items([{"text": t} for t in texts])
    ds = ds.map_batches(TokenizeAndPack, fn_constructor_args=(tokenizer_dir, seq_len, objective),
                        batch_size=256, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=1))
    if seed is not None:
        ds = ds.random_shuffle(seed=seed)
    return ds.materialize()
