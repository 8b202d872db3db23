"""The history store: users, their history items and the items' embeddings, in one SQLite file.

Embeddings live in a sqlite-vec `vec0` table whose partition key is the user, so a KNN
search is always restricted to one user's vectors. An item's row and its vectors are
written in the same transaction and deleted together: one vector (rowid = the item's id),
and for a long item one more for each of its parts (`parts.py`, rows in `item_parts`);
search finds an item by its nearest vector.

Search reads a user's vectors into memory once and scans them there (`search.py`), under a
byte budget; above it, sqlite-vec's KNN answers. The matrices follow this connection's own
writes and are dropped when another connection commits.

Erasure is physical: a deleted vector is overwritten with zeros before its row goes (old
sqlite-vec releases leave deleted vectors in their chunk), every connection runs with
`secure_delete`, and the write-ahead log is checkpointed and truncated after each delete
or forget, so neither the database file nor its -wal keeps the erased text or vectors; the
user's matrices in memory are overwritten with zeros at once.
"""

from __future__ import annotations

import json
import operator
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import (
    AnswerNotFoundError,
    InvalidInputError,
    ItemNotFoundError,
    PassphraseError,
    StoreMismatchError,
    UnknownUserError,
)
from ..files import new_private_file
from . import db, search
from .items import (
    HistoryItem,
    NewItem,
    content_hash,
    now_iso,
    validate_answer_id,
    validate_items,
    validate_user,
)
from .parts import WHOLE_CHARS, part_spans

_ITEM_COLUMNS = (
    "h.id, u.name, h.kind, h.text, h.created_at, h.written_at, h.metadata, h.content_hash"
)


@dataclass(frozen=True)
class UserInfo:
    """A user and the extent of their history."""

    name: str
    items: int
    first: str | None
    last: str | None


@dataclass(frozen=True)
class Part:
    """The part of a long item that a search found: number `number` of `count`, the
    characters `start:stop` of the item's text."""

    number: int
    count: int
    start: int
    stop: int

    def to_json(self) -> dict[str, int]:
        return {"number": self.number, "count": self.count, "start": self.start, "stop": self.stop}


@dataclass(frozen=True)
class SearchHit:
    """A history item found by vector search, with its cosine distance to the query, and
    the `part` of a long item that was nearest (None: the vector of the item's whole text
    was, or it has no parts)."""

    item: HistoryItem
    distance: float
    part: Part | None = None

    @property
    def passage(self) -> HistoryItem:
        """The item as a prompt shows it: the part that was found (its metadata's
        `passage` says which, as "2/5"), or the item itself."""
        if self.part is None:
            return self.item
        return replace(
            self.item,
            text=self.item.text[self.part.start : self.part.stop],
            metadata={**self.item.metadata, "passage": f"{self.part.number}/{self.part.count}"},
        )


@dataclass(frozen=True)
class AnswerRecord:
    """An answer kept for feedback (only answers given with memory on): its id as the
    client saw it, the request (the remembered turn, `turn_id`), the answer's text, and the
    newest rating and edit given for it."""

    answer_id: str
    user: str
    request: str
    text: str
    strategy: str
    created_at: str
    turn_id: int
    rating: int | None = None
    edit: str | None = None
    edit_id: int | None = None


@dataclass(frozen=True)
class SourceFile:
    """A file as it was read for an import: where, how big, when modified, its sha256."""

    path: str
    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class SourceRecord:
    """A file a user's items were imported from, as it was when read, and how many items
    it links."""

    file: SourceFile
    imported_at: str
    items: int


@dataclass(frozen=True)
class Feedback:
    """One preference record: a rating (+1/-1) of an answer, or an edit (`edit_id`: the
    history item holding the text the user kept)."""

    answer_id: str
    user: str
    rating: int | None
    edit_id: int | None
    created_at: str


_ANSWER_QUERY = """SELECT a.answer_id, u.name, t.text, a.text, a.strategy, a.created_at, a.turn_id,
    (SELECT f.rating FROM feedback f WHERE f.answer_row = a.id AND f.rating IS NOT NULL
        ORDER BY f.id DESC LIMIT 1),
    (SELECT e.text FROM feedback f JOIN history e ON e.id = f.edit_id WHERE f.answer_row = a.id
        ORDER BY f.id DESC LIMIT 1),
    (SELECT f.edit_id FROM feedback f WHERE f.answer_row = a.id AND f.edit_id IS NOT NULL
        ORDER BY f.id DESC LIMIT 1)
    FROM answers a JOIN users u ON u.id = a.user_id JOIN history t ON t.id = a.turn_id
    WHERE a.user_id = ?"""


def _row_to_item(row: Sequence[Any]) -> HistoryItem:
    return HistoryItem(
        id=row[0],
        user=row[1],
        kind=row[2],
        text=row[3],
        created_at=row[4],
        written_at=row[5],
        metadata=json.loads(row[6]),
        content_hash=row[7],
    )


MAX_K = 4096  # sqlite-vec's largest k for one KNN query
_SPOT_CHECKS = 3  # vectors read from vec0's chunks that are compared with its rows
_MAX_ROWS = 2**62
_IN_BATCH = 500  # ids in one `IN (...)`: under every SQLite build's limit on parameters
_READ_AHEAD = 4  # vectors read for each item asked for: a long item's parts take places


def _by_distance(hit: tuple[int, float]) -> tuple[float, int]:
    return hit[1], hit[0]


def _as_rows(vector: Any) -> Any:
    """One item's vector (a row) or vectors (rows: a long item's parts) as rows."""
    arr = np.asarray(vector)
    return arr.reshape(1, -1) if arr.ndim == 1 else arr


def _count_param(value: Any, name: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidInputError(f"{name} must be an integer, not {value!r}.", field=name) from None


def _item_ids(ids: Sequence[Any]) -> list[int]:
    """Item ids as ints (numpy integers and digit strings too); anything else is refused."""
    checked = []
    for i in ids:
        try:
            checked.append(int(i) if isinstance(i, str) else operator.index(i))
        except (TypeError, ValueError):
            raise InvalidInputError(f"Item ids are integers, not {i!r}.", field="ids") from None
    return checked


def check_rating(rating: Any, with_edit: bool) -> int | None:
    """`rating` if it is +1 or -1 and no edit comes with it, None for an edit alone; else
    an InvalidInputError (feedback is a rating or an edit: one of them)."""
    if (rating is None) != with_edit:
        raise InvalidInputError(
            "Give feedback as a rating (+1 or -1) or as an edit (the text kept): one of them.",
            field="rating" if with_edit else "edit",
        )
    if rating is None:
        return None
    if isinstance(rating, bool) or rating not in (1, -1) or not isinstance(rating, int):
        raise InvalidInputError(f"A rating is +1 or -1, not {rating!r}.", field="rating")
    return int(rating)


def as_stored_text(text: Any) -> str:
    """An answer's text as it can be stored: text, with any NUL byte or unpaired surrogate
    a model might produce replaced."""
    if not isinstance(text, str):
        raise InvalidInputError(f"An answer is text, not {type(text).__name__}.", field="answer")
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def check_cache_budget(value: object) -> int:
    """`value` if it is a whole number of bytes, 0 or more; else InvalidInputError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(
            f"cache_budget must be a whole number of bytes, 0 or more (got {value!r}).",
            field="cache_budget",
        )
    return value


class HistoryStore:
    """Per-user history with embeddings. Safe to share between threads (one lock per store).

    `cache_budget`: the bytes of vectors kept in memory for search and `vectors()` (default
    `search.default_cache_budget()`: a quarter of the memory the process may use, at least
    256 MiB; a user's 1,000,000 vectors of 384 floats take 1.5 GB); a user whose matrix does
    not fit is searched by sqlite-vec in the database file, with the same results (but for
    long items' parts, of which it reads at most MAX_K vectors: see `search`)."""

    def __init__(
        self,
        path: str | Path,
        dim: int,
        *,
        passphrase: str | None = None,
        cache_budget: int | None = None,
    ):
        if cache_budget is None:
            cache_budget = search.default_cache_budget()
        check_cache_budget(cache_budget)
        self.path = str(path)
        self.dim = int(dim)
        self.encrypted = passphrase is not None
        self._lock = threading.RLock()
        self._cache = search.SearchCache(cache_budget)
        self._added: list[tuple[int, int, np.ndarray]] = []
        self._conn = db.connect(self.path, passphrase=passphrase)
        try:
            db.migrate(self._conn, {"dim": self.dim})
            stored = int(self._meta("embedding_dim"))
            if stored != self.dim:
                raise StoreMismatchError(self.path, stored, self.dim)
        except BaseException as exc:
            self._conn.close()
            if db.is_damage(exc):
                raise PassphraseError(self.path, "damaged") from None
            raise

    # --- plumbing --------------------------------------------------------------------------

    def _meta(self, key: str) -> str:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:  # every migrated store has it: a damaged file, or another program's
            raise PassphraseError(self.path, "damaged")
        return row[0]

    @property
    def driver(self) -> str:
        """Which DB-API module is in use (sqlite3 or pysqlite3)."""
        return db.driver_name(self._conn)

    def close(self) -> None:
        with self._lock:
            self._cache.clear(erase=True)
            self._conn.close()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _user_id(self, user: str) -> int:
        user = validate_user(user, existing=True)  # compared exactly, never folded
        row = self._conn.execute("SELECT id FROM users WHERE name = ?", (user,)).fetchone()
        if row is None:
            raise UnknownUserError(user)
        return row[0]

    def _check_vectors(self, vectors: np.ndarray, n: int) -> np.ndarray:
        try:
            arr = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"Vectors must be an array of numbers ({exc}).", field="vectors"
            ) from None
        if arr.shape != (n, self.dim):
            raise InvalidInputError(
                f"Expected {n} vectors of width {self.dim}, got an array of shape {arr.shape}.",
                field="vectors",
            )
        if not np.isfinite(arr).all():
            raise InvalidInputError("Vectors contain NaN or infinity.", field="vectors")
        return np.ascontiguousarray(arr)

    def _item_vectors(
        self, vectors: np.ndarray, checked: Sequence[NewItem]
    ) -> tuple[np.ndarray, list[list[tuple[int, int]]]]:
        """`vectors` checked against the items: one for each item's whole text and one for
        each part of a long one (`parts.vector_texts`, in item order); with each item's
        part spans."""
        spans = [part_spans(item.text) for item in checked]
        n = len(checked) + sum(len(s) for s in spans)
        try:
            rows = len(vectors)
        except TypeError:
            rows = None
        if n != len(checked) and rows == len(checked):
            raise InvalidInputError(
                f"Expected {n} vectors for {len(checked)} items, got one for each item: a "
                "long item has one for its whole text and one for each of its parts "
                "(edge_pllm.storage.parts.vector_texts gives the texts to embed).",
                field="vectors",
            )
        return self._check_vectors(vectors, n), spans

    # --- the matrices in memory ---------------------------------------------------------------

    @property
    def cache_budget(self) -> int:
        """The bytes of vectors this store may keep in memory (settable; 0 keeps none)."""
        return self._cache.budget

    @cache_budget.setter
    def cache_budget(self, value: int) -> None:
        check_cache_budget(value)
        with self._lock:
            self._cache.budget = value

    def cached_bytes(self, user: str | None = None) -> int:
        """The bytes of vectors this store keeps in memory now (of one user, or all)."""
        with self._lock:
            if user is None:
                return self._cache.used
            try:
                return self._cache.used_by(self._user_id(user))
            except (UnknownUserError, InvalidInputError):
                return 0

    def clear_cache(self) -> None:
        """Overwrite with zeros and drop every matrix kept in memory (they are read again
        when needed)."""
        with self._lock:
            self._cache.clear(erase=True)

    def _sync_cache(self) -> None:
        """Drop the matrices if the database changed other than through `_write`."""
        # data_version moves when another connection commits; total_changes when we write.
        self._cache.sync(self._cache_token())

    def _cache_token(self) -> tuple[int, int]:
        return self._conn.execute("PRAGMA data_version").fetchone()[0], self._conn.total_changes

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """A write transaction under the lock, after which the matrices in memory hold what it
        added (`_insert`) and what it erased (`_cache.erase`)."""
        with self._lock:
            self._added = []
            with db.transaction(self._conn) as conn:
                self._sync_cache()  # inside: no other connection commits until ours does
                yield conn
                token = self._cache_token()
            by_user: dict[int, list[tuple[int, np.ndarray]]] = {}
            for uid, item_id, vec in self._added:
                by_user.setdefault(uid, []).append((item_id, vec))
            for uid, added in by_user.items():
                ids = np.array([i for i, _ in added], dtype=np.int64)
                self._cache.added(uid, ids, search.normalize(np.stack([v for _, v in added])))
            self._added = []
            self._cache.token = token

    # --- writing ----------------------------------------------------------------------------

    def add(
        self, user: str, items: Sequence[NewItem | str | dict[str, Any]], vectors: np.ndarray
    ) -> list[int]:
        """Add items with their embeddings in one transaction; return their ids.

        `vectors` holds, in item order, each item's `parts.vector_texts` embedded: one per
        item, and for a long item one more for each of its parts. An item already stored
        for this user (same kind and text) is not stored twice: its existing id is
        returned. If any item is invalid nothing is written.
        """
        user = validate_user(user)
        checked = validate_items(items)
        arr, spans = self._item_vectors(vectors, checked)
        written = now_iso()
        with self._write() as conn:
            uid = self._ensure_user(conn, user, written)
            return self._insert(conn, uid, checked, arr, spans, written)

    @staticmethod
    def _ensure_user(conn: Any, user: str, written: str) -> int:
        row = conn.execute("SELECT id FROM users WHERE name = ?", (user,)).fetchone()
        if row is not None:
            return row[0]
        return conn.execute(
            "INSERT INTO users (name, created_at) VALUES (?, ?)", (user, written)
        ).lastrowid

    def _insert(
        self,
        conn: Any,
        uid: int,
        checked: Sequence[NewItem],
        arr: np.ndarray,
        spans: Sequence[Sequence[tuple[int, int]]],
        written: str,
        *,
        by_hand: bool = True,
    ) -> list[int]:
        """Insert checked items and their vectors, `spans` their parts (`_item_vectors`; the
        caller holds `_write`); an item already stored (same kind and text) keeps its row
        and id. Added `by_hand`, an item an imported file gave becomes the user's own: no
        file's change or removal takes it."""
        ids: list[int] = []
        at = 0
        for item, item_spans in zip(checked, spans, strict=True):
            vecs, at = arr[at : at + 1 + len(item_spans)], at + 1 + len(item_spans)
            digest = content_hash(item.kind, item.text)
            existing = conn.execute(
                "SELECT id FROM history WHERE user_id = ? AND kind = ? AND content_hash = ?",
                (uid, item.kind, digest),
            ).fetchone()
            if existing is not None:
                if by_hand:
                    conn.execute("DELETE FROM source_items WHERE item_id = ?", (existing[0],))
                ids.append(existing[0])
                continue
            item_id = conn.execute(
                "INSERT INTO history (user_id, kind, text, metadata, content_hash, created_at,"
                " written_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    uid,
                    item.kind,
                    item.text,
                    json.dumps(item.metadata, ensure_ascii=False),
                    digest,
                    item.created_at or written,
                    written,
                ),
            ).lastrowid
            self._put_vector(conn, uid, item_id, vecs[0])  # its whole text's, at its id
            self._insert_parts(conn, uid, item_id, vecs[1:], item_spans)
            ids.append(item_id)
        return ids

    def _put_vector(self, conn: Any, uid: int, vector_id: int, vec: np.ndarray) -> None:
        conn.execute(
            "INSERT INTO history_vec (rowid, user_id, embedding) VALUES (?, ?, ?)",
            (vector_id, uid, vec.tobytes()),
        )
        self._added.append((uid, vector_id, vec))

    def _insert_parts(
        self,
        conn: Any,
        uid: int,
        item_id: int,
        vecs: np.ndarray,
        spans: Sequence[tuple[int, int]],
    ) -> None:
        """Each part's vector (`spans`, in order) at the next free negative id, recorded in
        `item_parts` (the caller holds `_write`)."""
        if not spans:
            return
        (low,) = conn.execute("SELECT MIN(vector_id) FROM item_parts").fetchone()
        low = min(low or 0, 0)
        for number, (vec, (start, stop)) in enumerate(zip(vecs, spans, strict=True), 1):
            vector_id = low - number
            self._put_vector(conn, uid, vector_id, vec)
            conn.execute(
                "INSERT INTO item_parts (vector_id, item_id, user_id, part, parts, start, stop)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (vector_id, item_id, uid, number, len(spans), start, stop),
            )

    def items_without_parts(self, user: str) -> list[int]:
        """The ids of `user`'s items long enough for parts that have none (stored before
        parts were made): `add_parts` gives them theirs."""
        with self._lock:
            uid = self._user_id(user)
            rows = self._conn.execute(
                "SELECT id FROM history h WHERE user_id = ? AND length(text) > ? AND NOT EXISTS"
                " (SELECT 1 FROM item_parts p WHERE p.item_id = h.id) ORDER BY id",
                (uid, WHOLE_CHARS),
            ).fetchall()
        return [r[0] for r in rows]

    def item_text(self, user: str, item_id: int) -> str | None:
        """The text of `user`'s item `item_id` (None: no such item of theirs)."""
        (item_id,) = _item_ids([item_id])
        with self._lock:
            return self._own_text(self._conn, self._user_id(user), item_id)

    @staticmethod
    def _own_text(conn: Any, uid: int, item_id: int) -> str | None:
        """The text of the user's item `item_id`, None if it is not theirs (or cannot be a
        SQLite rowid at all)."""
        if not -(2**63) <= item_id < 2**63:
            return None
        row = conn.execute(
            "SELECT text FROM history WHERE id = ? AND user_id = ?", (item_id, uid)
        ).fetchone()
        return None if row is None else row[0]

    def add_parts(self, user: str, item_id: int, vectors: np.ndarray) -> int:
        """Give an item of `user` that has no parts a vector for each (`vectors`: its
        `parts.vector_texts` after the first, embedded); returns how many parts it got (0:
        it has them already, or needs none). ItemNotFoundError if it is not `user`'s."""
        (item_id,) = _item_ids([item_id])
        with self._write() as conn:
            uid = self._user_id(user)
            text = self._own_text(conn, uid, item_id)
            if text is None:
                raise ItemNotFoundError(item_id, user)
            if conn.execute("SELECT 1 FROM item_parts WHERE item_id = ?", (item_id,)).fetchone():
                return 0
            spans = part_spans(text)
            if spans:
                arr = self._check_vectors(vectors, len(spans))
                self._insert_parts(conn, uid, item_id, arr, spans)
        return len(spans)

    # --- imported files -----------------------------------------------------------------------

    def import_source(
        self,
        user: str,
        source: SourceFile,
        items: Sequence[NewItem | str | dict[str, Any]],
        vectors: np.ndarray,
    ) -> tuple[int, int]:
        """Store what the file `source` gave in one transaction: the items it gave before
        (and no other file links) go, these come (an item already stored is linked, not
        stored twice; one added by hand stays the user's own), and the file is recorded as
        read. Returns (items added, items removed). If any item is invalid nothing changes."""
        user = validate_user(user)
        checked = validate_items(items) if items else []
        arr, spans = self._item_vectors(vectors, checked) if checked else (vectors, [])
        written = now_iso()
        with self._write() as conn:
            uid = self._ensure_user(conn, user, written)
            row = conn.execute(
                "SELECT id FROM sources WHERE user_id = ? AND path = ?", (uid, source.path)
            ).fetchone()
            removed = self._unlink_source(conn, uid, row[0]) if row is not None else 0
            if row is None:
                source_id = conn.execute(
                    "INSERT INTO sources (user_id, path, sha256, size, mtime_ns, imported_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (uid, source.path, source.sha256, source.size, source.mtime_ns, written),
                ).lastrowid
            else:
                source_id = row[0]
                conn.execute(
                    "UPDATE sources SET sha256 = ?, size = ?, mtime_ns = ?, imported_at = ?"
                    " WHERE id = ?",
                    (source.sha256, source.size, source.mtime_ns, written, source_id),
                )
            ids = (
                self._insert(conn, uid, checked, arr, spans, written, by_hand=False)
                if checked
                else []
            )
            new = {item_id for _, item_id, _ in self._added if item_id > 0}
            for item_id in dict.fromkeys(ids):
                linked = conn.execute(
                    "SELECT 1 FROM source_items WHERE item_id = ? LIMIT 1", (item_id,)
                ).fetchone()
                if item_id in new or linked is not None:
                    conn.execute(
                        "INSERT OR IGNORE INTO source_items (source_id, item_id) VALUES (?, ?)",
                        (source_id, item_id),
                    )
        if removed:
            self.checkpoint()  # the replaced text leaves the write-ahead log now
        return len(new), removed

    def touch_source(self, user: str, source: SourceFile) -> None:
        """Record that the file was read again unchanged (its content hash the same), with
        its new size and modification time, so that the next import skips it by those."""
        with self._write() as conn:
            conn.execute(
                "UPDATE sources SET size = ?, mtime_ns = ? WHERE user_id = ? AND path = ?",
                (source.size, source.mtime_ns, self._user_id(user), source.path),
            )

    def drop_source(self, user: str, path: str) -> int:
        """Forget the imported file `path` of `user`: the items only it links go with it.
        Returns how many items went."""
        with self._write() as conn:
            uid = self._user_id(user)
            row = conn.execute(
                "SELECT id FROM sources WHERE user_id = ? AND path = ?", (uid, path)
            ).fetchone()
            if row is None:
                return 0
            removed = self._unlink_source(conn, uid, row[0])
            conn.execute("DELETE FROM sources WHERE id = ?", (row[0],))
        self.checkpoint()
        return removed

    def _unlink_source(self, conn: Any, uid: int, source_id: int) -> int:
        """Unlink a file's items (the caller holds `_write`); those no other file links are
        deleted, text and vector. Returns how many were deleted."""
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT item_id FROM source_items WHERE source_id = ?", (source_id,)
            )
        ]
        conn.execute("DELETE FROM source_items WHERE source_id = ?", (source_id,))
        gone = [
            i
            for i in ids
            if conn.execute("SELECT 1 FROM source_items WHERE item_id = ?", (i,)).fetchone() is None
        ]
        if gone:
            self._cache.erase(uid)
        for item_id in gone:
            self._erase_vectors(conn, item_id)
            conn.execute("DELETE FROM history WHERE id = ?", (item_id,))
        return len(gone)

    def sources(self, user: str) -> list[SourceRecord]:
        """The files `user`'s items were imported from (none for a user never seen)."""
        with self._lock:
            try:
                uid = self._user_id(user)
            except UnknownUserError:
                return []
            rows = self._conn.execute(
                "SELECT s.path, s.size, s.mtime_ns, s.sha256, s.imported_at,"
                " (SELECT COUNT(*) FROM source_items i WHERE i.source_id = s.id)"
                " FROM sources s WHERE s.user_id = ? ORDER BY s.path",
                (uid,),
            ).fetchall()
        return [SourceRecord(SourceFile(*r[:4]), r[4], r[5]) for r in rows]

    # --- memory and feedback ------------------------------------------------------------------

    def remember(
        self,
        user: str,
        turn: NewItem,
        vector: np.ndarray,
        *,
        answer_id: str,
        answer: str,
        strategy: str,
    ) -> int:
        """Store the user's turn as a history item (deduplicated like any item) and the
        answer given to it, for feedback, in one transaction; return the turn's item id.
        A new user is created. InvalidInputError if `answer_id` is already one of theirs."""
        user = validate_user(user)
        answer_id = validate_answer_id(answer_id)
        checked = validate_items([turn])
        arr, spans = self._item_vectors(_as_rows(vector), checked)
        answer = as_stored_text(answer)
        written = now_iso()
        with self._write() as conn:
            uid = self._ensure_user(conn, user, written)
            if conn.execute(
                "SELECT 1 FROM answers WHERE user_id = ? AND answer_id = ?", (uid, answer_id)
            ).fetchone():
                raise InvalidInputError(
                    f"The answer id {answer_id!r} is already used for {user!r}.", field="answer_id"
                )
            (turn_id,) = self._insert(conn, uid, checked, arr, spans, written)
            conn.execute(
                "INSERT INTO answers (user_id, answer_id, turn_id, text, strategy, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (uid, answer_id, turn_id, answer, strategy, written),
            )
        return turn_id

    def answer(self, user: str, answer_id: str) -> AnswerRecord:
        """The answer `answer_id` of `user`; AnswerNotFoundError if none is kept (another
        user's answer is not found either)."""
        answer_id = validate_answer_id(answer_id)
        with self._lock:
            uid = self._user_id(user)
            row = self._conn.execute(
                _ANSWER_QUERY + " AND a.answer_id = ?", (uid, answer_id)
            ).fetchone()
        if row is None:
            raise AnswerNotFoundError(answer_id, user)
        return AnswerRecord(*row)

    def answers(self, user: str) -> list[AnswerRecord]:
        """Every answer kept for `user`, oldest first, with its newest rating and edit."""
        with self._lock:
            uid = self._user_id(user)
            rows = self._conn.execute(
                _ANSWER_QUERY + " ORDER BY a.created_at, a.id", (uid,)
            ).fetchall()
        return [AnswerRecord(*row) for row in rows]

    def add_feedback(
        self,
        user: str,
        answer_id: str,
        *,
        rating: int | None = None,
        edit: NewItem | None = None,
        vector: np.ndarray | None = None,
    ) -> Feedback:
        """Record a rating (+1/-1) of one of `user`'s answers, or an edit: the text they
        kept, stored as a history item (with its `vector`) in the same transaction. Exactly
        one of the two; AnswerNotFoundError (nothing stored) if the answer is not theirs."""
        answer_id = validate_answer_id(answer_id)
        rating = check_rating(rating, edit is not None)
        checked, arr, spans = None, None, []
        if edit is not None:
            checked = validate_items([edit])
            if vector is None:
                raise InvalidInputError("An edit needs its vector.", field="vector")
            arr, spans = self._item_vectors(_as_rows(vector), checked)
        written = now_iso()
        with self._write() as conn:
            uid = self._user_id(user)
            row = conn.execute(
                "SELECT id FROM answers WHERE user_id = ? AND answer_id = ?", (uid, answer_id)
            ).fetchone()
            if row is None:
                raise AnswerNotFoundError(answer_id, user)
            edit_id = None
            if checked is not None and arr is not None:
                (edit_id,) = self._insert(conn, uid, checked, arr, spans, written)
            conn.execute(
                "INSERT INTO feedback (answer_row, rating, edit_id, created_at)"
                " VALUES (?, ?, ?, ?)",
                (row[0], rating, edit_id, written),
            )
        return Feedback(answer_id, user, rating, edit_id, written)

    def _erase_vectors(self, conn: Any, item_id: int) -> None:
        """Overwrite and delete the item's vectors, its parts' too (before the item's row
        goes: its `item_parts` rows go with it)."""
        parts = conn.execute(
            "SELECT vector_id FROM item_parts WHERE item_id = ?", (item_id,)
        ).fetchall()
        for vector_id in (item_id, *(r[0] for r in parts)):
            conn.execute(
                "UPDATE history_vec SET embedding = ? WHERE rowid = ?", (self._zeros, vector_id)
            )
            conn.execute("DELETE FROM history_vec WHERE rowid = ?", (vector_id,))

    @property
    def _zeros(self) -> bytes:
        return bytes(4 * self.dim)

    def delete(self, user: str, ids: Sequence[int]) -> int:
        """Delete items of `user` (text and vector); all of them, or none if one is not theirs."""
        ids = _item_ids(ids)
        with self._lock:
            with self._write() as conn:
                uid = self._user_id(user)
                self._cache.erase(uid)
                for item_id in dict.fromkeys(ids):
                    if self._own_text(conn, uid, item_id) is None:
                        raise ItemNotFoundError(item_id, user)  # rolls the whole call back
                    self._erase_vectors(conn, item_id)
                    conn.execute("DELETE FROM history WHERE id = ?", (item_id,))
            self.checkpoint()
        return len(set(ids))

    def forget(self, user: str) -> int:
        """Remove a user with all their items and vectors; return how many items went."""
        with self._lock:
            with self._write() as conn:
                uid = self._user_id(user)
                self._cache.erase(uid)
                ids = [
                    r[0] for r in conn.execute("SELECT id FROM history WHERE user_id = ?", (uid,))
                ]
                for item_id in ids:
                    self._erase_vectors(conn, item_id)
                # Their answers and feedback (the cascade would take them with the turns),
                # and the files they imported.
                conn.execute("DELETE FROM answers WHERE user_id = ?", (uid,))
                conn.execute("DELETE FROM sources WHERE user_id = ?", (uid,))
                conn.execute("DELETE FROM history WHERE user_id = ?", (uid,))
                conn.execute("DELETE FROM users WHERE id = ?", (uid,))
            self.checkpoint()
        return len(ids)

    def checkpoint(self) -> bool:
        """Move the write-ahead log into the database file and truncate the log, so that no
        erased row survives in it. False when another connection's read kept part of the
        log (that part is cleared by a later checkpoint, e.g. the next delete or close)."""
        with self._lock:
            return db.checkpoint(self._conn)

    def backup(self, dest: str | Path) -> Path:
        """Write a consistent copy of the whole database to the new file `dest` (VACUUM
        INTO; an encrypted store's copy is encrypted with the same key) and return its
        absolute path. The copy is owner-only (0o600): it is created empty first (VACUUM
        INTO fills an empty file), and SQLite is given its absolute path, never read as a
        URI. A name that is taken (a symbolic link too, even dangling), a missing or
        unwritable folder: InvalidInputError."""
        target = new_private_file(dest, field="dest")
        try:
            with self._lock:
                self._conn.execute("VACUUM INTO ?", (str(target),))
            written = target.stat().st_size
        except BaseException as exc:  # no half copy left, even when interrupted
            target.unlink(missing_ok=True)
            if not (db.is_sqlite_error(exc) or isinstance(exc, OSError)):
                raise
            reason = str(exc).rstrip(".")
            raise InvalidInputError(
                f"Cannot back up to {target}: {reason}.", field="dest"
            ) from None
        if not written:  # never seen since the name is absolute; a copy that is not there
            target.unlink(missing_ok=True)
            raise InvalidInputError(f"SQLite wrote nothing to {target}.", field="dest")
        return target

    # --- reading ----------------------------------------------------------------------------

    def has_user(self, user: str) -> bool:
        try:
            self._user_id(user)
        except (UnknownUserError, InvalidInputError):
            return False
        return True

    def users(self) -> list[UserInfo]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT u.name, COUNT(h.id), MIN(h.created_at), MAX(h.created_at) FROM users u"
                " LEFT JOIN history h ON h.user_id = u.id GROUP BY u.id ORDER BY u.name"
            ).fetchall()
        return [UserInfo(*row) for row in rows]

    def count(self, user: str | None = None) -> int:
        with self._lock:
            if user is None:
                return self._conn.execute("SELECT COUNT(*) FROM history").fetchone()[0]
            return self._conn.execute(
                "SELECT COUNT(*) FROM history WHERE user_id = ?", (self._user_id(user),)
            ).fetchone()[0]

    def vector_count(self, user: str | None = None) -> int:
        """How many vectors are stored (for one user, or all): count() and one for each
        part of a long item (`parts`) when consistent."""
        with self._lock:
            if user is None:
                return self._conn.execute("SELECT COUNT(*) FROM history_vec").fetchone()[0]
            try:
                uid = self._user_id(user)
            except (UnknownUserError, InvalidInputError):
                return 0
            return self._conn.execute(
                "SELECT COUNT(*) FROM history_vec WHERE user_id = ?", (uid,)
            ).fetchone()[0]

    def items(
        self, user: str, *, limit: int | None = None, offset: int = 0, newest_first: bool = True
    ) -> list[HistoryItem]:
        """A user's items ordered by creation time."""
        order = "DESC" if newest_first else "ASC"
        limit = -1 if limit is None else min(_count_param(limit, "limit"), _MAX_ROWS)
        offset = min(max(_count_param(offset, "offset"), 0), _MAX_ROWS)
        with self._lock:
            uid = self._user_id(user)
            rows = self._conn.execute(
                f"SELECT {_ITEM_COLUMNS} FROM history h JOIN users u ON u.id = h.user_id"
                f" WHERE h.user_id = ? ORDER BY h.created_at {order}, h.id {order}"
                " LIMIT ? OFFSET ?",
                (uid, limit, offset),
            ).fetchall()
        return [_row_to_item(r) for r in rows]

    def iter_items(self, user: str, batch: int = 1000) -> Iterator[HistoryItem]:
        """All of a user's items, oldest first, read in batches."""
        offset = 0
        while True:
            chunk = self.items(user, limit=batch, offset=offset, newest_first=False)
            yield from chunk
            if len(chunk) < batch:
                return
            offset += batch

    def search(
        self, user: str, query: np.ndarray, k: int, skip_kind: str | None = None
    ) -> list[SearchHit]:
        """The `k` items of `user` nearest to `query` (cosine), nearest first (k ≤ MAX_K);
        a long item at the distance of its nearest vector, its whole text's or one of its
        parts' (the hit's `part`); vectors at the same distance in id order. Exact: the
        user's vectors are scanned in memory (read once, see `cache_budget`), or by
        sqlite-vec when they do not fit. `skip_kind`: the nearest items of every other
        kind, however many of that kind are nearer (from the file: among the nearest
        MAX_K)."""
        try:
            query = np.asarray(query, dtype=np.float32).reshape(1, -1)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"The query is not a vector ({exc}).", field="query") from None
        vec = self._check_vectors(query, 1)[0]
        k = _count_param(k, "k")
        if k < 1:
            raise InvalidInputError("k must be at least 1.", field="k")
        k = min(k, MAX_K)
        with self._lock:
            uid = self._user_id(user)
            if skip_kind is None:
                hits = self._nearest_items(uid, vec, k)
            else:
                hits = self._nearest_not_of(uid, vec, k, skip_kind)
            if not hits:
                return []
            marks = ",".join("?" * len(hits))
            rows = self._conn.execute(  # by id: `+` keeps SQLite from scanning the user's index
                f"SELECT {_ITEM_COLUMNS} FROM history h JOIN users u ON u.id = h.user_id"
                f" WHERE h.id IN ({marks}) AND +h.user_id = ?",
                (*[h[0] for h in hits], uid),
            ).fetchall()
        by_id = {r[0]: _row_to_item(r) for r in rows}
        return [SearchHit(by_id[i], d, part) for i, d, part in hits if i in by_id]

    def _nearest_items(
        self, uid: int, vec: np.ndarray, k: int
    ) -> list[tuple[int, float, Part | None]]:
        """The `k` items nearest to `vec`, each by its nearest vector: (item id, distance,
        the part that vector is, None for the item's own), ties in item id order. Reads
        more vectors while the same items' parts fill the first `k`: in memory, until every
        vector is read; from the file, at most MAX_K (long items whose parts fill those can
        leave fewer than `k`)."""
        if not vec.any():  # no direction: every item at distance 1, the first ones by id
            rows = self._conn.execute(
                "SELECT id FROM history WHERE user_id = ? ORDER BY id LIMIT ?", (uid, k)
            ).fetchall()
            return [(r[0], 1.0, None) for r in rows]
        want = _READ_AHEAD * k
        while True:
            hits = self._nearest(uid, vec, want)
            parts = self._parts_of([i for i, _ in hits])
            found: dict[int, tuple[int, float, Part | None]] = {}
            for vector_id, distance in hits:
                item_id, part = parts.get(vector_id, (vector_id, None))
                if item_id not in found:
                    found[item_id] = (item_id, distance, part)
            if len(found) >= k or len(hits) < want:  # fewer: all there is, or MAX_K from the file
                return sorted(found.values(), key=lambda hit: (hit[1], hit[0]))[:k]
            want *= 8

    def _nearest_not_of(
        self, uid: int, vec: np.ndarray, k: int, kind: str
    ) -> list[tuple[int, float, Part | None]]:
        """`_nearest_items` of any kind but `kind`: reads ids eight times deeper while items
        of `kind` fill what it read, until `k` are found or every item is read (the texts
        are read only for the hits kept)."""
        want = k
        while True:
            hits = self._nearest_items(uid, vec, want)
            ids = [h[0] for h in hits]
            skipped: set[int] = set()
            for at in range(0, len(ids), _IN_BATCH):
                batch = ids[at : at + _IN_BATCH]
                marks = ",".join("?" * len(batch))
                rows = self._conn.execute(
                    f"SELECT id FROM history WHERE kind = ? AND id IN ({marks})", (kind, *batch)
                )
                skipped.update(r[0] for r in rows)
            kept = [h for h in hits if h[0] not in skipped]
            if len(kept) >= k or len(hits) < want:
                return kept[:k]
            want *= 8

    def _parts_of(self, vector_ids: Sequence[int]) -> dict[int, tuple[int, Part]]:
        """Which item, and which part of it, each of these vectors is (only parts' vectors,
        the negative ids, are named)."""
        wanted = [i for i in vector_ids if i < 0]
        found: dict[int, tuple[int, Part]] = {}
        for at in range(0, len(wanted), _IN_BATCH):
            batch = wanted[at : at + _IN_BATCH]
            rows = self._conn.execute(
                "SELECT vector_id, item_id, part, parts, start, stop FROM item_parts"
                f" WHERE vector_id IN ({','.join('?' * len(batch))})",
                batch,
            )
            found.update((r[0], (r[1], Part(*r[2:]))) for r in rows)
        return found

    def _nearest(self, uid: int, vec: np.ndarray, k: int) -> list[tuple[int, float]]:
        self._sync_cache()  # the caller holds the lock
        query = search.normalize(vec[None].copy())[0]  # not the caller's array
        matrix = self._cache.get(uid, search.KNN)
        if matrix is not None:
            return search.top_k(matrix, query, k)
        (n,) = self._conn.execute(
            "SELECT (SELECT COUNT(*) FROM history WHERE user_id = ?)"
            " + (SELECT COUNT(*) FROM item_parts WHERE user_id = ?)",
            (uid, uid),
        ).fetchone()
        if not self._cache.fits(search.Vectors.size(n, self.dim)):
            return self._sqlite_vec_nearest(uid, vec, k)
        matrix = self._read_matrix(uid, n)
        hits = search.top_k(matrix, query, k)
        if not self._cache.keep(uid, search.KNN, matrix):  # more rows than counted
            matrix.wipe()
        return hits

    def _sqlite_vec_nearest(self, uid: int, vec: np.ndarray, k: int) -> list[tuple[int, float]]:
        k = min(k, MAX_K)
        hits = self._conn.execute(
            "SELECT rowid, distance FROM history_vec"
            " WHERE embedding MATCH ? AND k = ? AND user_id = ? ORDER BY distance",
            (vec.tobytes(), int(k), uid),
        ).fetchall()
        # A stored vector of zeros has no distance in sqlite-vec (NULL); in memory it is 1.
        return sorted(((i, 1.0 if d is None else float(d)) for i, d in hits), key=_by_distance)

    def _read_matrix(self, uid: int, n: int) -> search.Vectors:
        """The user's `n` vectors (their items' and parts'), unit-normalized, in a
        matrix of their own."""
        matrix = search.Vectors(n, self.dim)
        if not self._read_chunks(uid, matrix):
            matrix.wipe()
            matrix.append_bytes(
                self._conn.execute(
                    "SELECT rowid, embedding FROM history_vec WHERE user_id = ?", (uid,)
                )
            )
        search.normalize(matrix.rows)
        return matrix

    def _read_chunks(self, uid: int, matrix: search.Vectors) -> bool:
        """Read the user's vectors into `matrix` straight from vec0's chunk tables (a blob of
        1,024 vectors at a time: about 5 times faster than through the virtual table's rows).
        False if those tables are not as sqlite-vec 0.1.x lays them out, or what they hold
        disagrees with the history's count or with vec0's own rows: the caller then reads
        the rows. `matrix` has room for exactly the user's vectors."""
        dim = self.dim
        try:  # `+`: compared without affinity, the chunk is found by vec0's index
            chunks = self._conn.execute(
                "SELECT c.size, c.validity, c.rowids, v.vectors FROM history_vec_chunks c"
                " JOIN history_vec_vector_chunks00 v ON v.rowid = +c.chunk_id"
                " WHERE c.partition00 = ? ORDER BY c.chunk_id",
                (uid,),
            )
            for size, validity, rowids, vectors in chunks:  # one chunk in memory at a time
                if not isinstance(size, int):
                    return False
                lengths = [
                    len(b) if isinstance(b, bytes) else -1 for b in (validity, rowids, vectors)
                ]
                if lengths != [(size + 7) // 8, 8 * size, 4 * dim * size]:
                    return False
                valid = np.unpackbits(
                    np.frombuffer(validity, np.uint8), count=size, bitorder="little"
                ).astype(bool)
                if matrix.n + np.count_nonzero(valid) > matrix.capacity:
                    return False
                rows = np.frombuffer(vectors, "<f4").reshape(size, dim)
                matrix.append(np.frombuffer(rowids, "<i8"), rows, where=valid)
        except Exception as exc:
            if db.is_sqlite_error(exc):
                return False
            raise
        # As many as the history and parts count (the capacity), each once, and a few read
        # back by id.
        ids = np.sort(matrix.ids)
        if matrix.n != matrix.capacity or (ids[1:] == ids[:-1]).any():
            return False
        for i in np.linspace(0, matrix.n - 1, min(matrix.n, _SPOT_CHECKS)).astype(int):
            row = self._conn.execute(
                "SELECT embedding FROM history_vec WHERE rowid = ?", (int(matrix.ids[i]),)
            ).fetchone()
            if row is None or row[0] != matrix.rows[i].tobytes():
                return False
        return True

    def vectors(self, user: str, limit: int | None = 512) -> tuple[list[int], np.ndarray]:
        """The user's newest `limit` item ids and embeddings (oldest first), for aggregation:
        each item's one vector of its whole text, never its parts'.

        Kept in memory for the next request (read-only, the same array until the user's
        history changes; see `cache_budget`)."""
        limit = None if limit is None else int(limit)  # a key beside search.KNN's
        with self._lock:
            uid = self._user_id(user)
            self._sync_cache()
            rows = self._cache.get(uid, limit)
            if rows is None:
                rows = self._read_vectors(uid, limit)
                self._cache.keep(uid, limit, rows)
            return rows.ids.tolist(), rows.frozen()

    def _read_vectors(self, uid: int, limit: int | None) -> search.Vectors:
        found = self._conn.execute(  # the caller holds the lock
            "SELECT h.id, v.embedding FROM history h JOIN history_vec v ON v.rowid = h.id"
            " WHERE h.user_id = ? AND v.user_id = ? ORDER BY h.created_at DESC, h.id DESC"
            " LIMIT ?",
            (uid, uid, -1 if limit is None else limit),
        ).fetchall()
        rows = search.Vectors(len(found), self.dim, shared=True)
        rows.append_bytes(reversed(found))
        return rows

    def integrity(self) -> dict[str, int | str]:
        """Counts that must agree, and SQLite's own integrity check."""
        with self._lock:
            check = self._conn.execute("PRAGMA integrity_check").fetchone()[0]
            orphans = self._conn.execute(
                "SELECT COUNT(*) FROM history h WHERE NOT EXISTS"
                " (SELECT 1 FROM history_vec v WHERE v.rowid = h.id)"
            ).fetchone()[0]
            parts = self._conn.execute("SELECT COUNT(*) FROM item_parts").fetchone()[0]
            lost_parts = self._conn.execute(
                "SELECT COUNT(*) FROM item_parts p WHERE NOT EXISTS"
                " (SELECT 1 FROM history_vec v WHERE v.rowid = p.vector_id)"
            ).fetchone()[0]
        return {
            "integrity_check": check,
            "items": self.count(),
            "parts": parts,
            "vectors": self.vector_count(),
            "items_without_vector": orphans,
            "parts_without_vector": lost_parts,
        }
