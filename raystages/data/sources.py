"""Reading rows from local files or hub datasets, with bad rows named or skipped and counted.

Local formats: ``.jsonl`` / ``.json`` (one object per line or a list), ``.parquet``, and
``.txt`` (paragraphs separated by blank lines, each one row ``{"text": ...}``). A directory
reads every supported file in it, sorted. Anything else that is not an existing path is
taken as a Hugging Face hub dataset name, read through ``datasets``.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".jsonl.gz", ".json.gz", ".txt.gz")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and row."""


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or _suffix(Path(value)) is not None or "\\" in value


def check_source(value: str) -> str | None:
    """Why ``value`` cannot be a data source, or None. Cheap: runs at spec validation."""
    if value == "builtin":
        return None
    path = Path(value).expanduser()
    if path.is_dir():
        if not any(_suffix(p) for p in path.iterdir()):
            return f"directory {value!r} holds no {'/'.join(SUFFIXES)} files"
        return None
    if path.is_file():
        if _suffix(path) is None:
            return f"{value!r}: unsupported file type; use one of {', '.join(SUFFIXES)}"
        if path.stat().st_size == 0:
            return f"{value!r} is empty"
        return None
    if _looks_like_path(value):
        return f"file {value!r} does not exist"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?", value):
        return f"{value!r} is neither an existing file nor a hub dataset name"
    return None


def _open_text(path: Path):
    opener = gzip.open if path.name.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", errors="strict")


PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def _paragraphs(f, chunk_chars: int = 1 << 20) -> Iterator[str]:
    """The non-blank pieces of ``PARAGRAPH_BREAK.split(text)``, read ``chunk_chars`` at a
    time so a large .txt is never held whole. A break is final once a non-space character
    follows it (more whitespace could still extend it); the text after it waits for more."""
    buf = ""
    while chunk := f.read(chunk_chars):
        buf += chunk
        text_end = len(buf.rstrip())
        cut = None
        for m in PARAGRAPH_BREAK.finditer(buf):
            if m.end() < text_end:
                cut = m
        if cut is not None:
            yield from (p for p in PARAGRAPH_BREAK.split(buf[:cut.start()]) if p.strip())
            buf = buf[cut.end():]
    yield from (p for p in PARAGRAPH_BREAK.split(buf) if p.strip())


def _file_rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, row) for every row of one file; ``where`` is ``file:row`` (1-based)."""
    kind = _suffix(path)
    try:
        if kind in (".txt", ".txt.gz"):
            with _open_text(path) as f:
                for i, para in enumerate(_paragraphs(f)):
                    yield f"{path}:paragraph {i + 1}", {"text": para}
        elif kind == ".parquet":
            import pyarrow.parquet as pq

            i = 0  # a row group at a time: a large file is never held whole
            for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    i += 1
                    yield f"{path}:row {i}", row
        else:
            with _open_text(path) as f:
                head = f.read(1).lstrip() if kind.startswith(".json") else ""
                f.seek(0)
                if head == "[":
                    for i, row in enumerate(json.load(f)):
                        yield f"{path}:item {i + 1}", row
                    return
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        yield f"{path}:line {i + 1}", json.loads(line)
                    except json.JSONDecodeError as e:
                        yield f"{path}:line {i + 1}", DataError(f"not valid JSON ({e.msg})")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte offset {e.start})") from None


def source_files(source: str) -> list[Path] | None:
    """The files of a local source in reading order (a directory's, sorted), or None for a
    hub dataset name."""
    path = Path(source).expanduser()
    if path.is_dir():
        return sorted(p for p in path.iterdir() if _suffix(p))
    return [path] if path.exists() else None


def iter_source(source: str, hub_split: str = "train") -> Iterator[tuple[str, object]]:
    files = source_files(source)
    if files is not None:
        for p in files:
            yield from _file_rows(p)
    else:
        import datasets

        for i, row in enumerate(datasets.load_dataset(source, split=hub_split)):
            yield f"{source}[{hub_split}]:row {i + 1}", row


@dataclass
class Rows:
    """Usable rows and what was skipped (``where: why``), so summaries can count them."""

    rows: list = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def read_rows(source: str, convert: Callable[[object], object], on_bad_row: str = "error",
              max_rows: int | None = None, hub_split: str = "train") -> Rows:
    """Apply ``convert`` (raises ``DataError`` on a bad row) to each row of ``source``."""
    out = Rows()
    for where, row in iter_source(source, hub_split):
        if max_rows is not None and len(out.rows) >= max_rows:
            break
        try:
            if isinstance(row, DataError):
                raise row
            out.rows.append(convert(row))
        except DataError as e:
            if on_bad_row == "error":
                raise DataError(f"{where}: {e}  (set data.on_bad_row=skip to skip such rows)") from None
            out.skipped.append(f"{where}: {e}")
    if not out.rows:
        raise DataError(f"{source}: no usable rows" + (f" ({len(out.skipped)} skipped)" if out.skipped else ""))
    return out


def text_of(field_name: str) -> Callable[[object], str]:
    """The text of a row's ``field_name``; a list of words (a tagging row's ``tokens``) is
    joined by single spaces, so labelled rows can serve as unlabelled pretraining text."""
    def convert(row: object) -> str:
        if not isinstance(row, dict):
            raise DataError(f"expected an object with field {field_name!r}, got {type(row).__name__}")
        value = row.get(field_name)
        if isinstance(value, list) and all(isinstance(w, str) for w in value):
            value = " ".join(value)
        if not isinstance(value, str):
            raise DataError(f"missing text field {field_name!r}" if value is None
                            else f"field {field_name!r} is {type(value).__name__}, not text")
        if not value.strip():
            raise DataError(f"field {field_name!r} is empty")
        return value
    return convert
