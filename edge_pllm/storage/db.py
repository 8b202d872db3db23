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

The database file is created owner-only (0o600) before SQLite opens it, and SQLite gives
its -wal, -shm and -journal files the database file's mode; files of an earlier release
are tightened when opened (`files.private_file`). SQLite is always given an absolute path,
which it cannot read as a `file:` URI.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import os
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

from ..errors import (
    ExtensionLoadingError,
    InvalidInputError,
    MissingDependencyError,
    PassphraseError,
)
from ..files import private_file

DRIVERS: tuple[str, ...] = ("sqlite3", "pysqlite3.dbapi2")
ENCRYPTED_DRIVER = "sqlcipher3.dbapi2"
BUSY_TIMEOUT_MS = 10_000
CHECKPOINT_TIMEOUT_MS = 2_000
SQLITE_MAGIC = b"SQLite format 3\x00"
MIN_PAGE = 512  # SQLite's smallest page: a database file, encrypted or not, has one at least
SIDE_FILES = ("-wal", "-shm", "-journal")


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
    kind = file_kind(path)
    if kind == "not_a_database":
        raise PassphraseError(str(path), "not_a_database")
    if kind == "encrypted_or_damaged":
        raise PassphraseError(str(path), "missing")
    name_for_sqlite = _prepare_file(path)
    reasons: list[str] = []
    for name in drivers:
        try:
            module = importlib.import_module(name)
        except ImportError:
            reasons.append(f"{name} is not installed")
            continue
        conn, reason = _try_load(module, name_for_sqlite)
        if conn is not None:
            try:
                _configure(conn, path)
            except BaseException as exc:
                conn.close()
                if is_damage(exc):
                    raise PassphraseError(str(path), "damaged") from None
                raise
            return conn
        reasons.append(reason or name)
    raise ExtensionLoadingError("; ".join(reasons))


def is_damage(exc: BaseException) -> bool:
    """SQLite's "database disk image is malformed" or "file is not a database" (a damaged
    header): a plain DatabaseError, where a busy or locked database is an OperationalError."""
    return is_sqlite_error(exc) and type(exc).__name__ == "DatabaseError"


def _is_memory(path: str | Path) -> bool:
    return str(path) in (":memory:", "")


def _prepare_file(path: str | Path) -> str:
    """The name to give SQLite for `path` (absolute: never read as a URI), with the file
    made owner-only first: created 0o600 if missing, and it and its side files tightened if
    an earlier release left them readable. An in-memory name is returned as it is."""
    if _is_memory(path):
        return str(path)
    absolute = os.path.abspath(path)
    # A missing folder, a read-only disk: SQLite says so in its own words.
    with contextlib.suppress(OSError):
        private_file(absolute, also=[absolute + suffix for suffix in SIDE_FILES])
    return absolute


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


def file_kind(path: str | Path) -> str:
    """What the first bytes of the file at `path` say it is: "new" (missing, empty or
    unreadable: SQLite starts it, or says why not), "sqlite" (SQLite's header),
    "not_a_database" (shorter than one page, text, or a zeroed header: no SQLite database,
    encrypted or not, looks like that), else "encrypted_or_damaged" (SQLCipher's file begins
    with random bytes: only the passphrase tells an encrypted file from a damaged one)."""
    if _is_memory(path):
        return "new"
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(4096)
    except OSError:
        return "new"
    if not head:
        return "new"
    if head.startswith(SQLITE_MAGIC):
        return "sqlite"
    if size < MIN_PAGE or not any(head[:16]) or _is_text(head):
        return "not_a_database"
    return "encrypted_or_damaged"


def _is_text(head: bytes) -> bool:
    """UTF-8 text without control characters other than white space: a random page of
    ciphertext is that with a probability far below 10^-100."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\t\n\r\f\v" for c in text)


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
    kind = file_kind(path)
    if kind == "sqlite":
        raise PassphraseError(str(path), "unencrypted")
    if kind == "not_a_database":
        raise PassphraseError(str(path), "not_a_database")
    name_for_sqlite = _prepare_file(path)
    conn = module.connect(name_for_sqlite, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
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


def _m003_answers(conn: Any, settings: dict[str, Any]) -> None:
    # Answers kept for feedback (only those given with memory on): the request is the
    # remembered turn (`turn_id`), so deleting that turn deletes the answer and its feedback.
    # A feedback row is a rating or an edit (a history item of its own), never both; it goes
    # with its answer, and an edit's row with the edit.
    for statement in (
        """CREATE TABLE answers (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            answer_id TEXT NOT NULL,
            turn_id INTEGER NOT NULL REFERENCES history(id) ON DELETE CASCADE,
            text TEXT NOT NULL,
            strategy TEXT NOT NULL,
            created_at TEXT NOT NULL,
            UNIQUE (user_id, answer_id)
        )""",
        "CREATE INDEX answers_turn ON answers (turn_id)",
        """CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            answer_row INTEGER NOT NULL REFERENCES answers(id) ON DELETE CASCADE,
            rating INTEGER CHECK (rating IN (-1, 1)),
            edit_id INTEGER REFERENCES history(id) ON DELETE CASCADE,
            created_at TEXT NOT NULL,
            CHECK ((rating IS NULL) <> (edit_id IS NULL))
        )""",
        "CREATE INDEX feedback_answer ON feedback (answer_row, id)",
        "CREATE INDEX feedback_edit ON feedback (edit_id)",
    ):
        conn.execute(statement)


def _m004_sources(conn: Any, settings: dict[str, Any]) -> None:
    # Files a user's items were imported from (`import USER PATH`): what the file was when
    # read (size, modification time, sha256) and which items it gave, so that importing
    # again skips it unchanged, replaces its items when it changed and removes them when it
    # is gone. An item a file gave goes with the last file that links it.
    for statement in (
        """CREATE TABLE sources (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            imported_at TEXT NOT NULL,
            UNIQUE (user_id, path)
        )""",
        """CREATE TABLE source_items (
            source_id INTEGER NOT NULL REFERENCES sources(id) ON DELETE CASCADE,
            item_id INTEGER NOT NULL REFERENCES history(id) ON DELETE CASCADE,
            PRIMARY KEY (source_id, item_id)
        )""",
        "CREATE INDEX source_items_item ON source_items (item_id)",
    ):
        conn.execute(statement)


def _m005_parts(conn: Any, settings: dict[str, Any]) -> None:
    # The parts of long items (`parts.py`): one row per part, naming the vector it has in
    # history_vec. An item's own vector (rowid = its id) is of its whole text; a part's
    # rowid is negative, so it never meets an item's id. The rows go with their item; the
    # store erases the vectors they name before the item goes.
    for statement in (
        """CREATE TABLE item_parts (
            vector_id INTEGER PRIMARY KEY,
            item_id INTEGER NOT NULL REFERENCES history(id) ON DELETE CASCADE,
            user_id INTEGER NOT NULL,
            part INTEGER NOT NULL,
            parts INTEGER NOT NULL,
            start INTEGER NOT NULL,
            stop INTEGER NOT NULL
        )""",
        "CREATE INDEX item_parts_item ON item_parts (item_id)",
        "CREATE INDEX item_parts_user ON item_parts (user_id, vector_id)",
    ):
        conn.execute(statement)


MIGRATIONS: list[tuple[str, Migration]] = [
    ("m001_initial", _m001_initial),
    ("m002_vectors", _m002_vectors),
    ("m003_answers", _m003_answers),
    ("m004_sources", _m004_sources),
    ("m005_parts", _m005_parts),
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
