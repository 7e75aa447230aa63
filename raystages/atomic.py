"""Writes that a crash cannot leave half done: each writes beside its target and renames it
into place, so a reader (a resume, a rerun, another stage) sees the old version or the new
one, never part of one."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Callable


def write_dir(write: Callable[[str], object], out_dir: str | os.PathLike) -> None:
    """``write(tmp)`` into a fresh folder beside ``out_dir``, then renamed into place."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()  # with the umask's permissions (tempfile.mkdtemp's are owner-only)
    try:
        write(str(tmp))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file(write: Callable[[BinaryIO], object], path: str | os.PathLike) -> None:
    """``write(f)`` into a binary file beside ``path``, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(partial, "wb") as f:
            write(f)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_file(lambda f: f.write(text.encode()), path)
