"""One token-cache writer task: read one unit of a source (a file, a hub dataset, or a chunk
of built-in rows), encode it (:mod:`raystages.data.encoders`: packed text blocks, or chat
examples) and write its records as parquet shards.

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
    if "rows" in unit:
        return ((f"builtin:{unit['split']}:row {unit['first'] + i + 1}", r) for i, r in enumerate(unit["rows"]))
    if "path" in unit:
        return _file_rows(Path(unit["path"]))
    return iter_source(unit["hub"], unit["hub_split"])


class _PartWriter:
    """Records of one split of one unit into ``part-<unit>-<k>.parquet`` files."""

    def __init__(self, out_dir: Path, unit_index: int):
        self.out_dir, self.unit_index = out_dir, unit_index
        self.pending: list[dict[str, np.ndarray]] = []
        self.writer, self.part, self.in_part, self.total = None, 0, 0, 0

    def add(self, record: dict[str, np.ndarray]) -> None:
        self.pending.append(record)
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
        columns = {}
        for name in self.pending[0]:
            # int32: vocabularies and the -100 label fit; half the bytes
            values = np.stack([r[name] for r in self.pending]).astype(np.int32)
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])
        table = pa.table(columns)
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


def write_unit(unit: dict, out_dir: str, tokenizer, encoding: dict, on_bad_row: str) -> dict:
    """Encode ``unit`` into ``out_dir/{train,val}/``; its counts and notes.

    ``unit["split"]``: ``train``, ``val``, or ``holdout`` — the encoder sends every
    ``unit["every"]``-th record (blocks of text, examples of chat) to ``val``, starting with
    the first, so any unit of 2+ records has both.
    """
    from raystages.data.encoders import encoder_for
    from raystages.data.sources import DataError

    encoder = encoder_for(encoding, tokenizer)
    writers = {s: _PartWriter(Path(out_dir) / s, unit["index"]) for s in ("train", "val")}
    cap = unit.get("cap")
    out = {"index": unit["index"], "rows": 0, "skipped": 0, "notes": [], "reasons": {}, "error": ""}

    def emit(records) -> None:
        for split, record in records:
            writers[split].add(record)

    items: list = []
    for where, row in unit_rows(unit):
        if cap is not None and out["rows"] >= cap:
            break
        try:
            if isinstance(row, DataError):
                raise row
            items.append(encoder.convert(row))
            out["rows"] += 1
        except DataError as e:
            if on_bad_row == "error":
                out["error"] = f"{where}: {e}  (set data.on_bad_row=skip to skip such rows)"
                break
            out["skipped"] += 1
            reason = str(e).split(": ")[0]  # "too long: 130 tokens > ..." counts as "too long"
            out["reasons"][reason] = out["reasons"].get(reason, 0) + 1
            if len(out["notes"]) < MAX_NOTES:
                out["notes"].append(f"{where}: {e}")
        if len(items) >= DOCS_PER_BATCH:
            emit(encoder.encode(items, unit["split"], unit.get("every", 0)))
            items = []
    if not out["error"]:
        emit(encoder.encode(items, unit["split"], unit.get("every", 0)) if items else ())
        emit(encoder.close())
    out["train_blocks"] = writers["train"].close()
    out["val_blocks"] = writers["val"].close()
    out["counts"] = json.dumps(encoder.counts)
    out["notes"], out["reasons"] = json.dumps(out["notes"]), json.dumps(out["reasons"])
    return out


def write_units(batch: dict, out_dir: str, tokenizer_dir: str, encoding: dict, on_bad_row: str) -> dict:
    """Ray Data ``map_batches`` function: ``{"unit": json}`` rows in, one row of counts each.
    A plain function, so Ray Data runs it as a task pool that grows with the cluster."""
    from raystages.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    rows = [write_unit(json.loads(u), out_dir, tokenizer, encoding, on_bad_row) for u in batch["unit"]]
    return {k: [r[k] for r in rows] for k in rows[0]}
