"""Streaming sources into the token cache with Ray Data, for real: formats, bad rows, a
failed or half-written fill, a second run that hits, and the per-epoch order."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raystages import cli
from raystages.data import token_cache
from raystages.data.sources import DataError
from raystages.spec import load_spec
from raystages.stages import pretrain

DOCS = [f"document {i}: " + " ".join(f"w{(i * 7 + j) % 50}" for j in range(5 + i % 20)) for i in range(600)]


def _spec(tmp_path: Path, tokenizer_dir, source, *extra):
    return load_spec(None, [f"run.storage_path={tmp_path}/runs", "run.name=prep", f"data.source={source}",
                            f"tokenizer.path={tokenizer_dir}", "optim.seq_len=32", "model.preset=nano",
                            *extra], stage="pretrain")


def _blocks(cache, split="train") -> list[list[int]]:
    return [row for f in cache.files(split) for row in pq.read_table(f)["input_ids"].to_pylist()]


def _write_formats(folder: Path) -> None:
    """The same 600 documents as a gzipped .txt, a .jsonl and a .parquet, one third each."""
    folder.mkdir()
    with gzip.open(folder / "a.txt.gz", "wt") as f:
        f.write("\n\n".join(DOCS[:200]) + "\n")
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[200:400]))
    pq.write_table(pa.table({"text": DOCS[400:]}), folder / "c.parquet")


def test_a_directory_of_formats_streams_into_the_cache_and_a_second_run_hits(
        ray_session, tmp_path, builtin_tokenizer_dir):
    _write_formats(tmp_path / "mixed")
    spec = _spec(tmp_path, builtin_tokenizer_dir, tmp_path / "mixed")
    _, first = pretrain.prepare(spec)
    assert not first.hit and first.manifest["rows"] == 600 and first.manifest["skipped"] == 0
    # One writer task per file; every 20th block (val_fraction 0.05), from each file's first, is held out.
    assert {f.split("-")[1] for f in first.manifest["files"]["train"]} == {"00000", "00001", "00002"}
    assert first.blocks["val"] == len(_blocks(first, "val")) >= 3
    _, second = pretrain.prepare(spec)
    assert second.hit and second.path == first.path and _blocks(second) == _blocks(first)
    # The same documents in one .jsonl: the same blocks, whatever the format they came in.
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:200]))
    (tmp_path / "mixed" / "b.jsonl").unlink()
    (tmp_path / "mixed" / "c.parquet").unlink()
    _, from_txt = pretrain.prepare(spec)
    _, from_jsonl = pretrain.prepare(_spec(tmp_path, builtin_tokenizer_dir, one))
    assert not from_txt.hit and from_txt.path != first.path  # the fingerprint changed
    assert _blocks(from_txt) == _blocks(from_jsonl) and _blocks(from_txt, "val") == _blocks(from_jsonl, "val")
    tokens = np.array(_blocks(from_txt))
    assert tokens.shape[1] == 32 and tokens.dtype == np.int64


def _big_jsonl(path: Path, bad_line: int) -> Path:
    lines = [json.dumps({"text": d}) for d in DOCS * 3]
    lines[bad_line - 1] = '{"text": "cut off'
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_bad_row_mid_file_fails_naming_it_or_is_counted_and_leaves_no_cache(
        ray_session, tmp_path, builtin_tokenizer_dir):
    source = _big_jsonl(tmp_path / "big.jsonl", bad_line=1234)
    spec = _spec(tmp_path, builtin_tokenizer_dir, source)
    assert pretrain.preflight(spec, frozenset()) == []  # beyond the rows the pre-flight reads
    with pytest.raises(DataError, match=r"big\.jsonl:line 1234: not valid JSON"):
        pretrain.prepare(spec)
    root = token_cache.cache_root(spec)
    assert list(root.iterdir()) == []  # the failed fill's tmp folder is gone; no cache
    _, cache = pretrain.prepare(_spec(tmp_path, builtin_tokenizer_dir, source, "data.on_bad_row=skip"))
    assert cache.manifest["skipped"] == 1 and cache.manifest["rows"] == 1799
    assert list(cache.manifest["skipped_by_reason"].values()) == [1]
    assert "big.jsonl:line 1234" in cache.manifest["skipped_notes"][0]
    # An error-mode run does not slip past the bad row through the cache that skip filled.
    with pytest.raises(DataError, match="line 1234"):
        pretrain.prepare(spec)


def test_a_half_written_cache_is_never_used(ray_session, tmp_path, builtin_tokenizer_dir):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    spec = _spec(tmp_path, builtin_tokenizer_dir, source)
    key, _ = token_cache.cache_key(spec, str(builtin_tokenizer_dir))
    root = token_cache.cache_root(spec)
    # What a writer killed half-way leaves: its tmp folder with shards and no manifest ...
    (root / f".{key}.tmp-dead").mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": [[1] * 32]}), root / f".{key}.tmp-dead" / "part-00000-0000.parquet")
    # ... and a folder under the final name holding shards but no manifest (never renamed
    # by a fill, e.g. copied by hand).
    (root / key / "train").mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": [[1] * 32]}), root / key / "train" / "part-00000-0000.parquet")
    assert token_cache.lookup(root, key) is None
    _, cache = pretrain.prepare(spec)
    assert not cache.hit and cache.path == root / key and cache.manifest["rows"] == 600
    assert len(_blocks(cache)) == cache.blocks["train"] > 1
    # A manifest naming a shard that is not there: incomplete, not used.
    (cache.path / "train" / cache.manifest["files"]["train"][0]).unlink()
    assert token_cache.lookup(root, key) is None


def test_every_epoch_has_its_own_order_and_a_resume_is_exact(ray_session, tmp_path, builtin_tokenizer_dir):
    from raystages.data.order import read_blocks, shard_order
    from raystages.train.worker import _epochs

    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    _, cache = pretrain.prepare(_spec(tmp_path, builtin_tokenizer_dir, source))
    ds = read_blocks(shard_order(cache.files("train"), 0))
    per_epoch = cache.blocks["train"] // 4  # micro-batches of 4 in one epoch (one rank)

    def run(start_epoch=0, skip=0, n=2 * per_epoch):
        it = _epochs(ds.iterator(), 4, "cpu", start_epoch, skip, shuffle_buffer=64, seed=0, rank=0)
        return [(e, i, b["input_ids"].tolist()) for (e, i, b), _ in zip(it, range(n))]

    full = run()
    epoch0 = {tuple(x) for e, _, b in full if e == 0 for x in b}
    epoch1 = {tuple(x) for e, _, b in full if e == 1 for x in b}
    assert [b for e, _, b in full if e == 0] != [b for e, _, b in full if e == 1]
    # Each epoch is the cache's blocks once over, less a partial micro-batch (drop_last).
    every = {tuple(x) for x in _blocks(cache)}
    assert epoch0 <= every and epoch1 <= every and min(len(epoch0), len(epoch1)) > len(every) - 4
    assert full == run()  # the same seed, the same order
    # Restarted in epoch 1 after 3 micro-batches: the next batches are the uninterrupted ones.
    resumed = run(start_epoch=1, skip=3, n=per_epoch - 3)
    assert resumed == [x for x in full if x[0] == 1][3:]


def test_prepare_checks_the_first_rows_before_ray_starts(tmp_path, capsys, no_ray):
    source = tmp_path / "rows.jsonl"
    source.write_text('{"body": "text under another name"}\n' * 3)
    code = cli.main(["prepare", f"data.source={source}", f"run.storage_path={tmp_path}"])
    assert code == 2
    assert "rows.jsonl:line 1: missing text field 'text'" in capsys.readouterr().err


def test_cache_blocks_stream_while_the_trainer_holds_every_cpu(ray_session, tmp_path, builtin_tokenizer_dir):
    """Two workers on a 2-CPU machine hold every CPU: the cache reader must not need one
    (a reader task that asks for a CPU would wait forever, and training with it)."""
    import ray

    from raystages.data.order import read_blocks

    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:200]))
    _, cache = pretrain.prepare(_spec(tmp_path, builtin_tokenizer_dir, source))

    @ray.remote(num_cpus=0)
    def count_blocks(ds) -> int:
        return sum(len(b["input_ids"]) for b in ds.iter_batches(batch_size=64))

    total = ray.cluster_resources()["CPU"]
    holder = ray.util.placement_group([{"CPU": total}])
    ray.get(holder.ready())
    try:
        # A guard against a hang, not a timing assertion: it finishes in seconds.
        assert ray.get(count_blocks.remote(read_blocks(cache.files("train"))), timeout=300) == cache.blocks["train"]
    finally:
        ray.util.remove_placement_group(holder)
