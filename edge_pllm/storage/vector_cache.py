"""Embeddings of texts kept by content hash in a plain SQLite file, so that a text is
embedded once across runs: the evaluation's run folder and the training's cache
(`<home>/cache/`) both use it.

A cache holds vectors of one embedder only: its file name should say which (see
`cache_key`). Several processes may share one file (SQLite locks it); a file that is not
a readable cache is set aside and started anew, never trusted. The file (and its journal)
is owner-only, and so is any folder made for it (`files`): vectors of private text can
tell a lot about it.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..files import private_dir, private_file

Embed = Callable[[list[str]], np.ndarray]
_CHUNK = 500  # keys per SELECT (SQLite's variable limit is 999 on old builds)
_BLOCK = 2048  # texts embedded and stored at a time


def cache_key(*parts: str) -> str:
    """A short stable key for what made the vectors (embedder file hashes, pooling, ...)."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class VectorCache:
    """`vectors(texts)`: each text's vector, from the file or embedded (and stored) once."""

    def __init__(self, path: str | Path, embed: Embed, dim: int):
        self.path = Path(path)
        private_dir(self.path.parent)
        self._embed, self.dim = embed, dim
        self.hits = self.misses = 0
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as exc:
            warnings.warn(
                f"The vector cache {self.path} was unreadable ({exc}); starting anew.",
                stacklevel=2,
            )
            self.path.replace(self.path.with_name(self.path.name + ".damaged"))
            self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        name = os.path.abspath(self.path)  # absolute: SQLite never reads it as a URI
        private_file(name, also=[name + "-journal"])  # the journal gets the file's mode
        conn = sqlite3.connect(name, timeout=60)
        conn.execute("CREATE TABLE IF NOT EXISTS vec (hash TEXT PRIMARY KEY, v BLOB)")
        conn.execute("SELECT count(*) FROM vec").fetchone()
        return conn

    def vectors(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32: cached vectors, the missing ones embedded and stored."""
        keys = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for k, v in self._conn.execute(
                f"SELECT hash, v FROM vec WHERE hash IN ({marks})", chunk
            ):
                row = np.frombuffer(v, dtype=np.float32)
                if row.shape == (self.dim,):  # a row of another width is embedded anew
                    found[k] = row
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        by_key = dict(zip(keys, texts, strict=True))
        # Stored block by block: an interrupted run keeps what it embedded.
        blocks = [missing[i : i + _BLOCK] for i in range(0, len(missing), _BLOCK)]
        bar = tqdm(
            total=len(missing), desc="Embedding", unit="text", disable=len(blocks) < 2, leave=False
        )
        with bar:
            for block in blocks:
                new = np.asarray(self._embed([by_key[k] for k in block]), dtype=np.float32)
                with self._conn:
                    self._conn.executemany(
                        "INSERT OR REPLACE INTO vec VALUES (?, ?)",
                        [(k, v.tobytes()) for k, v in zip(block, new, strict=True)],
                    )
                found.update(zip(block, new, strict=True))
                bar.update(len(block))
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if not keys:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([found[k] for k in keys])

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> VectorCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
