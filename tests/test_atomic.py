"""Writes a crash cannot leave half done (``raystages.atomic``): killed part-way, the target
keeps its old content and no temporary is left beside it."""

from __future__ import annotations

from pathlib import Path

import pytest

from raystages import atomic


def test_a_file_write_that_dies_leaves_the_old_file_and_no_partial(tmp_path):
    path = tmp_path / "state.json"
    atomic.write_text(path, "old")

    def dies(f):
        f.write(b"half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.write_file(dies, path)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]
    atomic.write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_folder_write_that_dies_leaves_the_old_folder_and_no_temporary(tmp_path):
    out = tmp_path / "model"
    atomic.write_dir(lambda d: Path(d, "weights").write_text("old"), out)

    def dies(d):
        Path(d, "weights").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.write_dir(dies, out)
    assert (out / "weights").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model"]
    atomic.write_dir(lambda d: Path(d, "weights").write_text("new"), out)
    assert (out / "weights").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_folder_gets_the_umasks_permissions_as_a_plain_mkdir_would(tmp_path):
    import os

    atomic.write_dir(lambda d: None, tmp_path / "model")
    (tmp_path / "plain").mkdir()
    assert os.stat(tmp_path / "model").st_mode == os.stat(tmp_path / "plain").st_mode
