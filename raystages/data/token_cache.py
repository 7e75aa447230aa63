"""The token cache: a source tokenised and packed once, read by every later run.

    runs/.cache/tokens/<key>/manifest.json        written last: its presence means complete
                            train/part-<unit>-<k>.parquet   blocks: input_ids, int32 x seq_len
                            val/part-<unit>-<k>.parquet

``<key>`` hashes what the blocks depend on: the source's fingerprint (each file's path, size
and mtime; the built-in generator's parameters; a hub name and split), the held-out rule,
``text_field``, ``max_rows``, the tokenizer's vocabulary digest, ``seq_len`` and the
objective. Parquet of fixed-size blocks rather than a raw ``.bin``: any parquet reader
opens it (``raystages.data.order.read_blocks`` streams it with Ray Data), one file per
shard carries its own schema, and row groups give seekable chunks.

A fill writes into ``.<key>.tmp-<uuid>/`` and renames it to ``<key>/`` after the manifest
is written: a crash half-way leaves only a tmp folder that no reader looks at, and of two
concurrent writers the second rename fails and that writer uses the first one's cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

FORMAT = 1
CACHE_SUBDIR = Path(".cache") / "tokens"
MANIFEST = "manifest.json"
BUILTIN_DOCS_PER_UNIT = 256


def cache_root(spec) -> Path:
    return Path(spec.run.storage_path).resolve() / CACHE_SUBDIR


def _files_fingerprint(source: str, hub_split: str) -> list | dict:
    from raystages.data.sources import source_files

    files = source_files(source)
    if files is None:
        return {"hub": source, "split": hub_split}
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def holdout_every(spec) -> int:
    """Every n-th block of the source is held out when there is no ``val_source``."""
    d = spec.data
    return 0 if d.source == "builtin" or d.val_source else max(2, round(1 / d.val_fraction))


def cache_key(spec, tokenizer_dir: str) -> tuple[str, dict]:
    """(key, what it hashes): the same data, tokenizer and packing give the same key."""
    from raystages.models import tokenizer_digest

    d = spec.data
    if d.source == "builtin":
        source = {"builtin": d.builtin.model_dump(mode="json")}
    else:
        source = {"source": _files_fingerprint(d.source, d.hub_split),
                  "val_source": _files_fingerprint(d.val_source, d.hub_split) if d.val_source else None,
                  "holdout_every": holdout_every(spec), "text_field": d.text_field, "max_rows": d.max_rows}
    described = {"format": FORMAT, **source, "tokenizer": tokenizer_digest(tokenizer_dir),
                 "seq_len": spec.optim.seq_len, "objective": spec.objective}
    blob = json.dumps(described, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20], described


@dataclass
class TokenCache:
    path: Path
    manifest: dict
    hit: bool

    def files(self, split: str) -> list[str]:
        return [str(self.path / split / name) for name in self.manifest["files"][split]]

    @property
    def blocks(self) -> dict[str, int]:
        return self.manifest["blocks"]


def lookup(root: Path, key: str) -> TokenCache | None:
    """The complete cache under ``root/key``, or None (absent, or not written by a fill)."""
    path = root / key
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT or not all(
            (path / split / f).is_file() for split in ("train", "val") for f in manifest["files"][split]):
        return None
    return TokenCache(path, manifest, hit=True)


def _units(spec) -> list[dict]:
    """What the writer tasks read, in order: built-in document chunks, or one unit per file."""
    from raystages.data.sources import source_files, text_of

    d = spec.data
    if d.source == "builtin":
        from raystages.task.splits import pretrain_texts

        b = d.builtin
        kw = {"noise": b.noise, "min_len": b.min_len, "max_len": b.max_len}
        units = []
        for split, n in (("train", b.num_train), ("val", b.num_val)):
            texts = pretrain_texts(split, n, b.seed, **kw)
            units += [{"split": split, "texts": texts[i:i + BUILTIN_DOCS_PER_UNIT]}
                      for i in range(0, len(texts), BUILTIN_DOCS_PER_UNIT)]
        return [u | {"index": i} for i, u in enumerate(units)]
    every = holdout_every(spec)
    units = []
    for source, split in ((d.source, "holdout" if every else "train"), (d.val_source, "val")):
        if source is None:
            continue
        files = source_files(source)
        caps = (_row_caps(files, text_of(d.text_field), d.max_rows) if files and d.max_rows
                else [None] * len(files or []))
        units += ([{"split": split, "path": str(f), "cap": c, "every": every}
                   for f, c in zip(files, caps) if c != 0]
                  if files is not None else
                  [{"split": split, "hub": source, "hub_split": d.hub_split, "cap": d.max_rows, "every": every}])
    return [u | {"index": i} for i, u in enumerate(units)]


def _row_caps(files: list[Path], convert, max_rows: int) -> list[int]:
    """Usable rows each file contributes under ``data.max_rows`` (files in order): a
    streaming count in the driver, only when ``max_rows`` is set."""
    from raystages.data.sources import DataError, _file_rows

    caps, left = [], max_rows
    for f in files:
        n = 0
        for _, row in _file_rows(f) if left else ():
            try:
                if not isinstance(row, DataError):
                    convert(row)
                    n += 1
            except DataError:
                pass
            if n >= left:
                break
        caps.append(n)
        left -= n
    return caps


def fill(spec, tokenizer_dir: str, key: str, described: dict) -> TokenCache:
    """Tokenise and pack the spec's source with Ray Data writer tasks into the cache."""
    import ray.data

    from raystages.data.shards import write_units
    from raystages.data.sources import DataError

    root = cache_root(spec)
    tmp = root / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        d = spec.data
        units = _units(spec)
        if not units:
            raise DataError(f"{d.source}: no usable rows within data.max_rows")
        ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units))
        results = ds.map_batches(
            write_units, batch_size=1, batch_format="numpy",
            fn_kwargs={"out_dir": str(tmp), "tokenizer_dir": tokenizer_dir, "seq_len": spec.optim.seq_len,
                       "objective": spec.objective, "text_field": d.text_field,
                       "on_bad_row": d.on_bad_row}).take_all()
        results.sort(key=lambda r: r["index"])
        errors = [r["error"] for r in results if r["error"]]
        if errors:
            raise DataError(errors[0])
        if sum(r["rows"] for r in results) == 0:
            skipped = sum(r["skipped"] for r in results)
            raise DataError(f"{d.source}: no usable rows" + (f" ({skipped} skipped)" if skipped else ""))
        manifest = {
            "format": FORMAT, "key": key, "described": described,
            "files": {s: sorted(p.name for p in (tmp / s).glob("*.parquet")) for s in ("train", "val")},
            "blocks": {s: sum(int(r[f"{s}_blocks"]) for r in results) for s in ("train", "val")},
            "rows": sum(int(r["rows"]) for r in results),
            "skipped": sum(int(r["skipped"]) for r in results),
            "skipped_notes": [n for r in results for n in json.loads(r["notes"])][:20],
            "skipped_by_reason": _sum_counts(json.loads(r["reasons"]) for r in results),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return _publish(tmp, root, key, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sum_counts(dicts) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def _publish(tmp: Path, root: Path, key: str, manifest: dict) -> TokenCache:
    """Rename the complete ``tmp`` to ``root/key``: atomic, so readers see all or nothing."""
    final = root / key
    try:
        os.rename(tmp, final)
    except OSError:
        theirs = lookup(root, key)
        if theirs is not None:  # another writer finished first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return theirs
        # A folder under the final name that no fill published (no manifest): not a cache.
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    return TokenCache(final, manifest, hit=False)


def ensure(spec, tokenizer_dir: str) -> TokenCache:
    """The spec's token cache, filled now on a miss. ``on_bad_row=error`` still fails on a
    cache that a ``skip`` run filled past bad rows."""
    from raystages.data.sources import DataError

    key, described = cache_key(spec, tokenizer_dir)
    found = lookup(cache_root(spec), key) or fill(spec, tokenizer_dir, key, described)
    if found.manifest["skipped"] and spec.data.on_bad_row == "error":
        raise DataError(f"{found.manifest['skipped_notes'][0]}  (set data.on_bad_row=skip to skip such rows)")
    return found
