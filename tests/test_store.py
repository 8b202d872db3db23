"""The history store on real SQLite + sqlite-vec."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edge_pllm.errors import (
    ExtensionLoadingError,
    InvalidInputError,
    ItemNotFoundError,
    StoreMismatchError,
    UnknownUserError,
)
from edge_pllm.storage import db
from edge_pllm.storage.items import NewItem
from edge_pllm.storage.store import HistoryStore

DIM = 8


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def store(tmp_path: Path):
    with HistoryStore(tmp_path / "h.db", DIM) as s:
        yield s


def snapshot(store: HistoryStore) -> tuple:
    users = [(u.name, u.items) for u in store.users()]
    items = {u: [(i.id, i.text) for i in store.items(u)] for u, _ in users}
    return users, items, store.vector_count()


def test_knn_never_crosses_users(store: HistoryStore):
    rng = np.random.default_rng(0)
    alice_vecs, bob_vecs = unit(rng, 20), unit(rng, 20)
    store.add("alice", [f"alice {i}" for i in range(20)], alice_vecs)
    store.add("bob", [f"bob {i}" for i in range(20)], bob_vecs)
    # Query with bob's exact vectors while searching alice: must still return only alice.
    for vec in bob_vecs:
        hits = store.search("alice", vec, k=10)
        assert len(hits) == 10
        assert {h.item.user for h in hits} == {"alice"}
        assert all(h.item.text.startswith("alice") for h in hits)
    # And the nearest of alice's own item is itself.
    hits = store.search("alice", alice_vecs[3], k=1)
    assert hits[0].item.text == "alice 3" and hits[0].distance < 1e-5


def test_forget_removes_rows_and_vectors(store: HistoryStore):
    rng = np.random.default_rng(1)
    store.add("alice", [f"a{i}" for i in range(5)], unit(rng, 5))
    store.add("bob", ["b0", "b1"], unit(rng, 2))
    assert store.forget("alice") == 5
    assert not store.has_user("alice")
    assert store.vector_count("alice") == 0
    raw = store._conn.execute("SELECT COUNT(*) FROM history WHERE text LIKE 'a%'").fetchone()[0]
    assert raw == 0
    assert store.count() == 2 and store.vector_count() == 2
    assert store.integrity()["items_without_vector"] == 0
    with pytest.raises(UnknownUserError):
        store.forget("alice")


def test_delete_removes_text_and_vector(store: HistoryStore):
    rng = np.random.default_rng(2)
    ids = store.add("alice", ["one", "two", "three"], unit(rng, 3))
    assert store.delete("alice", [ids[1]]) == 1
    assert [i.text for i in store.items("alice", newest_first=False)] == ["one", "three"]
    assert store.vector_count("alice") == 2


def test_delete_of_an_id_not_theirs_deletes_nothing(store: HistoryStore):
    rng = np.random.default_rng(2)
    ids = store.add("alice", ["one", "two"], unit(rng, 2))
    store.add("bob", ["bee"], unit(rng, 1))
    with pytest.raises(ItemNotFoundError) as err:
        store.delete("bob", [ids[0]])  # alice's item, through bob
    assert err.value.item_id == ids[0]
    with pytest.raises(ItemNotFoundError):
        store.delete("alice", [ids[1], 999_999])  # one good id, one unknown: neither goes
    assert store.count("alice") == 2 and store.vector_count("alice") == 2


def test_times_are_ordered_as_instants_across_zones(store: HistoryStore):
    rng = np.random.default_rng(9)
    items = [
        NewItem("tokyo morning", created_at="2024-01-02T10:00:00+09:00"),  # 01:00 UTC
        NewItem("utc three", created_at="2024-01-02T03:00:00Z"),
        NewItem("date only", created_at="2024-01-01"),
    ]
    store.add("alice", items, unit(rng, 3))
    newest = store.items("alice")
    assert [i.text for i in newest] == ["utc three", "tokyo morning", "date only"]
    assert newest[1].created_at == "2024-01-02T01:00:00+00:00"


@pytest.mark.parametrize(
    "bad",
    [
        "   ",
        "",
        b"\xff\xfe not utf-8",
        "x" * 1_000_001,
        "nul\x00byte",
        {"text": "ok", "created_at": "yesterday"},
        {"text": "ok", "metadata": {"v": float("nan")}},
        {"txt": "typo"},
        NewItem(text="ok", kind="has space"),
        42,
    ],
)
def test_batch_with_one_bad_item_leaves_nothing(store: HistoryStore, bad):
    rng = np.random.default_rng(3)
    store.add("alice", ["kept"], unit(rng, 1))
    before = snapshot(store)
    with pytest.raises(InvalidInputError) as err:
        store.add("alice", ["fine 1", bad, "fine 2"], unit(rng, 3))
    assert err.value.index == 1
    assert snapshot(store) == before


def test_wrong_vector_width_is_refused_and_changes_nothing(store: HistoryStore):
    before = snapshot(store)
    with pytest.raises(InvalidInputError, match="width 8"):
        store.add("alice", ["a"], np.zeros((1, DIM + 1), dtype=np.float32))
    with pytest.raises(InvalidInputError, match="NaN"):
        store.add("alice", ["a"], np.full((1, DIM), np.nan, dtype=np.float32))
    assert snapshot(store) == before


def test_failure_inside_transaction_rolls_back_text_and_vectors(store: HistoryStore):
    """An error raised by SQLite mid-batch (after some rows were inserted) leaves nothing."""
    rng = np.random.default_rng(4)
    store._conn.execute(
        "CREATE TRIGGER refuse AFTER INSERT ON history WHEN NEW.text = 'boom'"
        " BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    with pytest.raises(Exception, match="refused"):
        store.add("alice", ["first", "second", "boom"], unit(rng, 3))
    assert store.count() == 0 and store.vector_count() == 0 and store.users() == []


def test_duplicate_items_are_stored_once(store: HistoryStore):
    rng = np.random.default_rng(5)
    first = store.add("alice", ["same", "other"], unit(rng, 2))
    again = store.add("alice", ["same"], unit(rng, 1))
    assert again == first[:1]
    assert store.count("alice") == 2
    # The same text for another user is that user's own item.
    assert store.add("bob", ["same"], unit(rng, 1)) != first[:1]


def test_migrations_rerun_idempotently(tmp_path: Path):
    path = tmp_path / "m.db"
    rng = np.random.default_rng(6)
    with HistoryStore(path, DIM) as s:
        s.add("alice", ["kept across reopen"], unit(rng, 1))
        names = [r[0] for r in s._conn.execute("SELECT name FROM _migrations ORDER BY name")]
        assert names == [name for name, _ in db.MIGRATIONS]
        assert db.migrate(s._conn, {"dim": DIM}) == []
    with HistoryStore(path, DIM) as s:
        assert [i.text for i in s.items("alice")] == ["kept across reopen"]
        count = s._conn.execute("SELECT COUNT(*) FROM _migrations").fetchone()[0]
        assert count == len(db.MIGRATIONS)


def test_store_refuses_embedder_of_other_width(tmp_path: Path):
    HistoryStore(tmp_path / "d.db", DIM).close()
    with pytest.raises(StoreMismatchError) as err:
        HistoryStore(tmp_path / "d.db", DIM * 2)
    assert err.value.stored_dim == DIM and err.value.wanted_dim == DIM * 2


def test_unknown_user_is_a_typed_error(store: HistoryStore):
    with pytest.raises(UnknownUserError, match="nobody"):
        store.search("nobody", np.ones(DIM, dtype=np.float32), 3)
    with pytest.raises(UnknownUserError):
        store.items("nobody")


def test_names_are_exact_and_a_legacy_name_can_still_be_forgotten(store: HistoryStore):
    rng = np.random.default_rng(5)
    store.add("bob", ["bob's"], unit(rng, 1))
    for folded in ("bob\x1f", " bob", "bob\u3000", "\u200bbob"):
        with pytest.raises(InvalidInputError):
            store.add(folded, ["x"], unit(rng, 1))
        with pytest.raises(UnknownUserError):  # looked up exactly: not bob
            store.items(folded)
    with pytest.raises(InvalidInputError, match="'/'"):
        store.add("a/b", ["x"], unit(rng, 1))
    # A name stored under the old rule (the CLI once allowed '/') stays reachable.
    store._conn.execute("INSERT INTO users (name, created_at) VALUES ('a/b', '2024-01-01')")
    assert store.has_user("a/b")
    store.forget("a/b")
    assert not store.has_user("a/b") and [u.name for u in store.users()] == ["bob"]


def test_vectors_returns_most_recent_in_time_order(store: HistoryStore):
    rng = np.random.default_rng(7)
    vecs = unit(rng, 4)
    dates = ["2020-01-03", "2020-01-01", "2020-01-04", "2020-01-02"]
    store.add("alice", [NewItem(f"t{i}", created_at=d) for i, d in enumerate(dates)], vecs)
    ids, mat = store.vectors("alice", limit=3)
    # The three newest, oldest first: t3 (01-02), t0 (01-03), t2 (01-04); t1 is cut.
    np.testing.assert_array_equal(mat, vecs[[3, 0, 2]])
    assert [i.text for i in store.items("alice", limit=3)] == ["t2", "t0", "t3"]
    assert len(ids) == 3


def test_cached_vectors_follow_every_write(store: HistoryStore, tmp_path: Path):
    rng = np.random.default_rng(9)
    first = store.add("alice", ["a", "b"], unit(rng, 2))
    ids, mat = store.vectors("alice")
    assert ids == first and not mat.flags.writeable
    assert store.vectors("alice")[1] is mat  # served from memory while nothing changed

    (third,) = store.add("alice", ["c"], unit(rng, 1))  # this connection writes
    assert store.vectors("alice")[0] == [*first, third]
    store.delete("alice", [first[0]])
    assert store.vectors("alice")[0] == [first[1], third]

    with HistoryStore(store.path, DIM) as other:  # another connection writes
        (fourth,) = other.add("alice", ["d"], unit(rng, 1))
        assert store.vectors("alice")[0] == [first[1], third, fourth]
        other.forget("alice")
    with pytest.raises(UnknownUserError):
        store.vectors("alice")


def test_backup_is_a_consistent_copy(store: HistoryStore, tmp_path: Path):
    rng = np.random.default_rng(8)
    store.add("alice", ["a", "b"], unit(rng, 2))
    dest = store.backup(tmp_path / "backup.db")
    with HistoryStore(dest, DIM) as copy:
        assert copy.count("alice") == 2 and copy.vector_count("alice") == 2
    with pytest.raises(InvalidInputError):
        store.backup(dest)


def _module_without_extension_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A DB-API module like the sqlite3 of Pythons built without extension loading."""
    (tmp_path / "noext_sqlite.py").write_text(
        "import sqlite3\n"
        "class Connection(sqlite3.Connection):\n"
        "    def __getattribute__(self, name):\n"
        "        if name == 'enable_load_extension':\n"
        "            raise AttributeError(name)\n"
        "        return super().__getattribute__(name)\n"
        "def connect(*a, **k):\n"
        "    return sqlite3.connect(*a, factory=Connection, **k)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "noext_sqlite"


def test_falls_back_when_sqlite3_cannot_load_extensions(tmp_path, monkeypatch):
    noext = _module_without_extension_loading(tmp_path, monkeypatch)
    conn = db.connect(tmp_path / "f.db", drivers=(noext, "pysqlite3.dbapi2", "sqlite3"))
    version = conn.execute("SELECT vec_version()").fetchone()[0]
    assert version.startswith("v0.")
    assert db.driver_name(conn) in {"pysqlite3", "sqlite3"}


def test_no_loadable_sqlite_names_the_fix(tmp_path, monkeypatch):
    noext = _module_without_extension_loading(tmp_path, monkeypatch)
    with pytest.raises(ExtensionLoadingError) as err:
        db.connect(tmp_path / "g.db", drivers=(noext, "not_installed_sqlite"))
    assert "pip install pysqlite3-binary" in str(err.value)
    assert "not_installed_sqlite is not installed" in err.value.detail


@pytest.mark.skipif(sys.platform != "linux", reason="pysqlite3-binary ships Linux wheels only")
def test_default_drivers_load_sqlite_vec(tmp_path):
    conn = db.connect(tmp_path / "x.db")
    assert conn.execute("SELECT vec_version()").fetchone()[0]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("budget", [None, 0])  # the matrix in memory; sqlite-vec's file
def test_search_can_skip_a_kind_however_many_of_it_are_nearer(tmp_path, budget):
    """`skip_kind`: the nearest items of other kinds, past thousands of nearer ones of that
    kind (remembered turns); sqlite-vec answers among its nearest MAX_K."""
    rng = np.random.default_rng(3)
    query = unit(rng, 1)[0]
    n = 5000
    near = query + rng.normal(0, 0.05, (n, DIM)).astype(np.float32)
    far = (query + rng.normal(0, 0.6, (2, DIM))).astype(np.float32)
    with HistoryStore(tmp_path / "h.db", DIM, cache_budget=budget) as s:
        s.add("ann", [NewItem(f"turn {i}", kind="turn") for i in range(n)], near)
        s.add("ann", ["note a", "note b"], far)
        s.add("bob", ["bob's note"], query[None])  # nearer, another person's
        assert all(h.item.kind == "turn" for h in s.search("ann", query, 100))
        found = sorted(h.item.text for h in s.search("ann", query, 2, skip_kind="turn"))
        # In memory every vector is read; from the file, sqlite-vec's nearest 4,096 are turns.
        assert found == (["note a", "note b"] if budget is None else [])
        assert all(h.item.kind != "turn" for h in s.search("ann", query, 5, skip_kind="turn"))
        first = next(iter(s.search("ann", query, 1, skip_kind="text")))
        assert first.item.kind == "turn"
