"""SQLite connections with sqlite-vec loaded, and the named, append-only schema migrations.

Many Python builds (pyenv's, macOS system Python) ship a `sqlite3` module without
`enable_load_extension`; there we fall back to `pysqlite3` (the `pysqlite3-binary` wheel),
a drop-in DB-API module with its own SQLite, and fail with a plain fix if neither works.

With a passphrase the database is encrypted at rest by SQLCipher (the `sqlcipher3` module
of the `sqlcipher3-binary` wheel: SQLite 3.51 with SQLCipher 4, which loads sqlite-vec):
every page of the file and of its write-ahead log is AES-256 encrypted with a key derived
from the passphrase (PBKDF2-HMAC-SHA512), and temporary tables and indices stay in memory.
See docs/SECURITY.md for what that does and does not cover.

Every connection runs with `secure_delete = ON`: deleted rows are overwritten with zeros
in the database file, so erasing an item leaves no plaintext behind once the write-ahead
log is checkpointed (`checkpoint()`).
"""

from __future__ import annotations

import importlib
import random
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import sqlite_vec

from .errors import (
    ExtensionLoadingError,
    InvalidInputError,
    MissingDependencyError,
    PassphraseError,
)

DRIVERS: tuple[str, ...] = ("sqlite3", "pysqlite3.dbapi2")
ENCRYPTED_DRIVER = "sqlcipher3.dbapi2"
BUSY_TIMEOUT_MS = 10_000
CHECKPOINT_TIMEOUT_MS = 2_000
SQLITE_MAGIC = b"SQLite format 3\x00"


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


def connect(
    path: str | Path, drivers: Sequence[str] = DRIVERS, passphrase: str | None = None
) -> Any:
    """Open `path` with the first DB-API driver in `drivers` that can load sqlite-vec.

    With `passphrase`, open (or create) it encrypted with SQLCipher instead: a wrong
    passphrase, or one given for a plaintext database, raises PassphraseError.
    """
    if passphrase is not None:
        return _connect_encrypted(path, passphrase)
    reasons: list[str] = []
    for name in drivers:
        try:
            module = importlib.import_module(name)
        except ImportError:
            reasons.append(f"{name} is not installed")
            continue
        conn, reason = _try_load(module, str(path))
        if conn is not None:
            try:
                _configure(conn, path)
            except Exception as exc:
                conn.close()
                if is_sqlite_error(exc) and _looks_encrypted(path):
                    raise PassphraseError(str(path), "missing") from None
                raise
            return conn
        reasons.append(reason or name)
    raise ExtensionLoadingError("; ".join(reasons))


def _configure(conn: Any, path: str | Path) -> None:
    conn.isolation_level = None  # autocommit; transactions are explicit (transaction())
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA secure_delete = ON")
    if str(path) != ":memory:":
        _use_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")


def _use_wal(conn: Any) -> None:
    """Switch to WAL, retrying while another process holds the lock: SQLite answers a
    journal-mode change on a database being created elsewhere with SQLITE_BUSY at once,
    without its busy handler, so processes opening a new store together would fail."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL").fetchall()
            return
        except Exception as exc:
            locked = is_sqlite_error(exc) and "locked" in str(exc).lower()
            if not locked or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.005, 0.05))


def _looks_encrypted(path: str | Path) -> bool:
    """A non-empty file without SQLite's header: encrypted, or not a database at all."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError:
        return False
    return bool(head) and head != SQLITE_MAGIC


def _connect_encrypted(path: str | Path, passphrase: str) -> Any:
    if not isinstance(passphrase, str) or not passphrase or "\x00" in passphrase:
        raise InvalidInputError(
            "The passphrase must be non-empty text without NUL bytes.", field="passphrase"
        )
    try:
        module = importlib.import_module(ENCRYPTED_DRIVER)
    except ImportError:
        raise MissingDependencyError(
            "sqlcipher3-binary", "encryption", "An encrypted history database"
        ) from None
    existing = str(path) != ":memory:" and Path(path).is_file() and Path(path).stat().st_size
    if existing and not _looks_encrypted(path):
        raise PassphraseError(str(path), "unencrypted")
    conn = module.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    try:
        # PRAGMA takes no bound parameters: the passphrase goes in as a quoted SQL string.
        conn.execute("PRAGMA key = '{}'".format(passphrase.replace("'", "''")))
        conn.execute("PRAGMA cipher_log_level = NONE")  # a wrong key is our typed error
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchall()  # no open read
        except module.DatabaseError:
            raise PassphraseError(str(path), "wrong") from None
        conn.execute("PRAGMA temp_store = MEMORY")  # no temporary files, encrypted or not
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
        _configure(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


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
    """True for sqlite3.Error from any driver (stdlib, pysqlite3 and sqlcipher3 have distinct
    classes)."""
    return isinstance(exc, sqlite3.Error) or type(exc).__module__.startswith(
        ("pysqlite3", "sqlcipher3")
    )


def checkpoint(conn: Any) -> bool:
    """Copy the write-ahead log into the database file and truncate it to zero bytes, so
    that no older page version (e.g. of a deleted row) stays in the -wal file. False if
    another connection's open read kept part of the log (it is cleared on a later call)."""
    # It waits for readers and writers to finish, but not for the full busy timeout.
    conn.execute(f"PRAGMA busy_timeout = {CHECKPOINT_TIMEOUT_MS}")
    try:
        row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return row is None or row[0] == 0
