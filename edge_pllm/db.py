"""SQLite connections with sqlite-vec loaded, and the named, append-only schema migrations.

Many Python builds (pyenv's, macOS system Python) ship a `sqlite3` module without
`enable_load_extension`; there we fall back to `pysqlite3` (the `pysqlite3-binary` wheel),
a drop-in DB-API module with its own SQLite, and fail with a plain fix if neither works.
"""

from __future__ import annotations

import importlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import sqlite_vec

from .errors import ExtensionLoadingError

DRIVERS: tuple[str, ...] = ("sqlite3", "pysqlite3.dbapi2")
BUSY_TIMEOUT_MS = 10_000


def _try_load(module: ModuleType, path: str) -> tuple[Any, str | None]:
    conn = module.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    if not hasattr(conn, "enable_load_extension"):
        conn.close()
        return None, f"{module.__name__} was built without enable_load_extension"
    try:
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
    except Exception as exc:  # each driver fails in its own way; we report them all
        conn.close()
        return None, f"{module.__name__}: {exc}"
    return conn, None


def connect(path: str | Path, drivers: Sequence[str] = DRIVERS) -> Any:
    """Open `path` with the first DB-API driver in `drivers` that can load sqlite-vec."""
    reasons: list[str] = []
    for name in drivers:
        try:
            module = importlib.import_module(name)
        except ImportError:
            reasons.append(f"{name} is not installed")
            continue
        conn, reason = _try_load(module, str(path))
        if conn is not None:
            conn.isolation_level = None  # autocommit; transactions are explicit (transaction())
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            if str(path) != ":memory:":
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
            return conn
        reasons.append(reason or name)
    raise ExtensionLoadingError("; ".join(reasons))


def driver_name(conn: Any) -> str:
    return type(conn).__module__.split(".")[0]


# --- migrations -------------------------------------------------------------------------
# Append only: never edit or reorder an applied migration; add a new one at the end.

Migration = Callable[[Any, dict[str, Any]], None]


def _m001_initial(conn: Any, settings: dict[str, Any]) -> None:
    # One statement per execute: executescript() would COMMIT the migration's transaction.
    for statement in (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE history (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            text TEXT NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}',
            content_hash TEXT NOT NULL,
            created_at TEXT NOT NULL,
            written_at TEXT NOT NULL,
            UNIQUE (user_id, kind, content_hash)
        )""",
        "CREATE INDEX history_user_time ON history (user_id, created_at, id)",
    ):
        conn.execute(statement)


def _m002_vectors(conn: Any, settings: dict[str, Any]) -> None:
    dim = int(settings["dim"])
    conn.execute(
        "CREATE VIRTUAL TABLE history_vec USING vec0("
        f"user_id integer partition key, embedding float[{dim}] distance_metric=cosine)"
    )
    conn.execute("INSERT INTO meta (key, value) VALUES ('embedding_dim', ?)", (str(dim),))


MIGRATIONS: list[tuple[str, Migration]] = [
    ("m001_initial", _m001_initial),
    ("m002_vectors", _m002_vectors),
]


def migrate(conn: Any, settings: dict[str, Any]) -> list[str]:
    """Apply every migration not yet recorded, each in its own transaction; return their names."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    done = {row[0] for row in conn.execute("SELECT name FROM _migrations")}
    applied = []
    for name, step in MIGRATIONS:
        if name in done:
            continue
        with transaction(conn):
            # Another process may have applied it while we waited for the write lock.
            if conn.execute("SELECT 1 FROM _migrations WHERE name = ?", (name,)).fetchone():
                continue
            step(conn, settings)
            conn.execute(
                "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                (name, datetime.now(UTC).isoformat(timespec="seconds")),
            )
        applied.append(name)
    return applied


@contextmanager
def transaction(conn: Any) -> Iterator[Any]:
    """A write transaction (BEGIN IMMEDIATE): all of the block lands, or none of it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def is_sqlite_error(exc: BaseException) -> bool:
    """True for sqlite3.Error from any driver (stdlib and pysqlite3 have distinct classes)."""
    return isinstance(exc, sqlite3.Error) or type(exc).__module__.startswith("pysqlite3")
