"""One token-cache writer task: read one unit of a source (a file, a hub dataset, or a chunk
of built-in documents), tokenise and pack it, and write its blocks as parquet shards.

Runs inside Ray Data (``map_batches`` over the units, a task pool that scales with the
cluster's CPUs), so the corpus is read where the tasks run and never reaches the driver.
A task returns one small row of counts, skipped-row notes and, for ``on_bad_row=error``,
the first bad row as ``file:row: why``; the driver turns that into a ``DataError``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DOCS_PER_BATCH = 256  # documents tokenised per call of the fast tokenizer
BLOCKS_PER_ROW_GROUP = 1024
BLOCKS_PER_PART = 16384  # a large file becomes several shards, shuffled as units
MAX_NOTES = 20


def unit_rows(unit: dict):
    """``(where, row)`` of one unit, lazily."""
    from raystages.data.sources import _file_rows, iter_source

    if "texts" in unit:
        return ((f"builtin:doc {i + 1}", {"text": t}) for i, t in enumerate(unit["texts"]))
    if "path" in unit:
        return _file_rows(Path(unit["path"]))
    return iter_source(unit["hub"], unit["hub_split"])


class _PartWriter:
    """Blocks of one split of one unit into ``part-<unit>-<k>.parquet`` files."""

    def __init__(self, out_dir: Path, unit_index: int):
        self.out_dir, self.unit_index = out_dir, unit_index
        self.pending: list[np.ndarray] = []
        self.writer, self.part, self.in_part, self.total = None, 0, 0, 0

    def add(self, block: np.ndarray) -> None:
        self.pending.append(block)
        if len(self.pending) >= BLOCKS_PER_ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.pending:
            return
        if self.writer is not None and self.in_part >= BLOCKS_PER_PART:
            self.writer.close()
            self.writer, self.part, self.in_part = None, self.part + 1, 0
        blocks = np.stack(self.pending).astype(np.int32)  # vocabularies fit; half the bytes
        table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(
            pa.array(blocks.ravel()), blocks.shape[1])})
        if self.writer is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / f"part-{self.unit_index:05d}-{self.part:04d}.parquet"
            self.writer = pq.ParquetWriter(path, table.schema)
        self.writer.write_table(table)
        self.in_part += len(self.pending)
        self.total += len(self.pending)
        self.pending = []

    def close(self) -> int:
        self.flush()
        if self.writer is not None:
            self.writer.close()
        return self.total


def write_unit(unit: dict, out_dir: str, tokenizer, seq_len: int, objective: str,
               text_field: str, on_bad_row: str) -> dict:
    """Tokenise and pack ``unit`` into ``out_dir/{train,val}/``; its counts and notes.

    ``unit["split"]``: ``train``, ``val``, or ``holdout`` — every ``unit["every"]``-th
    block, starting with the first, goes to ``val`` (so any unit of 2+ blocks has both).
    """
    from raystages.data.packing import Packer, special_ids
    from raystages.data.sources import DataError, text_of

    convert = text_of(text_field)
    eos, bos = special_ids(tokenizer, objective)
    packer = Packer(eos, seq_len, bos)
    writers = {s: _PartWriter(Path(out_dir) / s, unit["index"]) for s in ("train", "val")}
    cap = unit.get("cap")
    out = {"index": unit["index"], "rows": 0, "skipped": 0, "notes": [], "reasons": {}, "error": ""}
    n_blocks = 0

    def emit(docs: list[str]) -> None:
        nonlocal n_blocks
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
        for block in packer.feed(ids):
            split = unit["split"]
            if split == "holdout":
                split = "val" if n_blocks % unit["every"] == 0 else "train"
            writers[split].add(block)
            n_blocks += 1

    docs: list[str] = []
    for where, row in unit_rows(unit):
        if cap is not None and out["rows"] >= cap:
            break
        try:
            if isinstance(row, DataError):
                raise row
            docs.append(convert(row))
            out["rows"] += 1
        except DataError as e:
            if on_bad_row == "error":
                out["error"] = f"{where}: {e}  (set data.on_bad_row=skip to skip such rows)"
                break
            out["skipped"] += 1
            out["reasons"][str(e)] = out["reasons"].get(str(e), 0) + 1
            if len(out["notes"]) < MAX_NOTES:
                out["notes"].append(f"{where}: {e}")
        if len(docs) >= DOCS_PER_BATCH:
            emit(docs)
            docs = []
    if docs and not out["error"]:
        emit(docs)
    out["train_blocks"] = writers["train"].close()
    out["val_blocks"] = writers["val"].close()
    out["notes"], out["reasons"] = json.dumps(out["notes"]), json.dumps(out["reasons"])
    return out


def write_units(batch: dict, out_dir: str, tokenizer_dir: str, seq_len: int, objective: str,
                text_field: str, on_bad_row: str) -> dict:
    """Ray Data ``map_batches`` function: ``{"unit": json}`` rows in, one row of counts each.
    A plain function, so Ray Data runs it as a task pool that grows with the cluster."""
    from raystages.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    rows = [write_unit(json.loads(u), out_dir, tokenizer, seq_len, objective, text_field, on_bad_row)
            for u in batch["unit"]]
    return {k: [r[k] for r in rows] for k in rows[0]}
