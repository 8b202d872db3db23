"""Replacing a file in one step: a reader sees the old content or the new, never half.

The new content is written to a temporary file in the same folder (so the final rename
stays on one file system), flushed to disk, then renamed over the destination with
`os.replace`, which is atomic on POSIX and Windows. On failure the temporary file is
removed and the destination is left as it was. Files made here are owner-only (0o600).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield an empty owner-only temporary file beside `path` for the block to write (by
    name: for writers that take a path, such as converters and quantizers); when the block
    succeeds the file is flushed to disk and renamed over `path`, when it fails it is
    removed."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Replace the file at `path` with `data` (text is written as UTF-8) in one step; the
    folder must exist. Returns `path`."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        fh.write(payload)
    return Path(path)


def _fsync(path: Path) -> None:
    """Flush `path`'s content to disk (opened for writing: Windows refuses to flush a
    read-only handle)."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty owner-only temporary folder beside `path` for the block to fill; when
    the block succeeds the folder takes `path`'s place (an old one is removed first), when it
    fails it is removed. An interrupted build never leaves half a folder under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield work
        if path.exists():
            shutil.rmtree(path)
        os.replace(work, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
