"""Tokenisation and packing of plain text into fixed-length causal-LM blocks (Ray Data)."""

from __future__ import annotations

import numpy as np


def pack(token_lists: list[list[int]], eos_id: int, seq_len: int) -> np.ndarray:
    """Concatenate documents, each followed by ``eos_id``, and cut into ``(n, seq_len)`` blocks.

    The tail shorter than ``seq_len`` is dropped (per Ray Data batch, so at most one partial
    block per batch is lost). Documents may straddle blocks: plain GPT-style packing.
    """
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        flat.append(eos_id)
    n = len(flat) // seq_len
    return np.asarray(flat[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


class TokenizeAndPack:
    """Ray Data ``map_batches`` callable: ``{"text"}`` rows in, ``{"input_ids"}`` blocks out."""

    def __init__(self, tokenizer_dir: str, seq_len: int):
        from raystages.models import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.seq_len = seq_len

    def __call__(self, batch: dict) -> dict:
        ids = self.tokenizer(list(batch["text"]), add_special_tokens=False)["input_ids"]
        return {"input_ids": pack(ids, self.tokenizer.eos_token_id, self.seq_len)}


def packed_dataset(texts: list[str], tokenizer_dir: str, seq_len: int, seed: int | None):
    """A materialised Ray Dataset of packed blocks, shuffled once with ``seed`` (None: keep order).

    Materialised before the trainer starts: on a 2-CPU machine, streaming Ray Data tasks
    beside the training workers can starve for CPUs.
    """
    import ray.data

    ds = ray.data.from_items([{"text": t} for t in texts])
    ds = ds.map_batches(TokenizeAndPack, fn_constructor_args=(tokenizer_dir, seq_len),
                        batch_size=256, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=1))
    if seed is not None:
        ds = ds.random_shuffle(seed=seed)
    return ds.materialize()
