"""Guarantee 4, erasure: after deleting items or forgetting a user, no row, vector or
plaintext of theirs remains in the database file, its write-ahead log or its shared-memory
index. Checked on the raw bytes of every file of the database for a unique marker string
(in a short item, and in a long one that spills into overflow pages) and for the exact
float32 bytes of each erased vector, while the other users' data stays readable.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from edge_pllm.cli import cli
from edge_pllm.storage import db as edge_db
from edge_pllm.storage.items import NewItem
from edge_pllm.storage.parts import texts_to_embed
from edge_pllm.storage.store import HistoryStore, SourceFile

DIM = 384


def db_files(db: Path) -> list[Path]:
    return [p for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()]


def raw_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db_files(db))


def distinctive(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def items_for(user: str, marker: str, n: int = 6) -> list[str]:
    short = [f"{user} note {i}: {marker}-{i}" for i in range(n - 1)]
    long = f"{user} diary {marker}-long " + "private words " * 1500  # ~20 kB: overflow pages
    return [*short, long]


def vectors_for(rng: np.random.Generator, texts: list[str]) -> np.ndarray:
    """Distinct vectors for the items of `texts`: the long one's parts have their own."""
    return distinctive(rng, len(texts_to_embed(texts)))


def plaintexts(marker: str, n: int = 6) -> list[bytes]:
    return [f"{marker}-{i}".encode() for i in range(n - 1)] + [f"{marker}-long".encode()]


@pytest.fixture
def store(tmp_path: Path):
    with HistoryStore(tmp_path / "history.db", DIM) as s:
        yield s


def pieces(vec: np.ndarray) -> list[bytes]:
    """A vector's float32 bytes in 32-byte pieces: a vector in sqlite-vec's chunk blob can
    straddle a page boundary (the next overflow page's header splits it), a piece rarely."""
    raw = vec.astype(np.float32).tobytes()
    return [raw[i : i + 32] for i in range(0, len(raw), 32)]


def assert_gone(db: Path, needles: list[bytes]) -> int:
    data = raw_bytes(db)
    for needle in needles:
        assert needle not in data, f"{needle[:40]!r} is still in the database files"
    return len(data)


def test_forget_leaves_no_text_or_vector_in_any_file(store: HistoryStore, report_counts):
    db = Path(store.path)
    rng = np.random.default_rng(7)
    alice, bob = items_for("alice", "ALICE-SECRET-7f3a"), items_for("bob", "BOB-KEEP-19c2")
    alice_vecs, bob_vecs = vectors_for(rng, alice), vectors_for(rng, bob)
    assert len(alice_vecs) > 6, "the long item's parts have vectors that must go too"
    store.add("alice", alice, alice_vecs)
    store.add("bob", bob, bob_vecs)
    store.checkpoint()
    store.add("alice", ["one more ALICE-SECRET-7f3a-late"], distinctive(rng, 1))  # in the -wal
    before = raw_bytes(db)
    needles = [*plaintexts("ALICE-SECRET-7f3a"), b"ALICE-SECRET-7f3a-late"]
    assert all(n in before for n in needles), "the test must see the text before erasing"
    vec_pieces = [p for v in alice_vecs for p in pieces(v)]
    assert sum(p in before for p in vec_pieces) >= len(vec_pieces) - len(alice_vecs)
    needles += vec_pieces

    assert store.forget("alice") == 7
    searched = assert_gone(db, needles)
    # Bob's data is intact and still found by bytes and by query.
    after = raw_bytes(db)
    assert all(n in after for n in plaintexts("BOB-KEEP-19c2"))
    assert sum(p in after for v in bob_vecs for p in pieces(v)) >= len(bob_vecs) * (
        len(pieces(bob_vecs[0])) - 1
    )
    assert store.search("bob", bob_vecs[2], 1)[0].item.text.startswith("bob note 2")
    assert store.integrity()["integrity_check"] == "ok"
    report_counts(f"{searched:,} bytes searched for {len(needles)} erased needles: 0 found")


def test_delete_single_items_erases_their_bytes(store: HistoryStore, report_counts):
    db = Path(store.path)
    rng = np.random.default_rng(8)
    texts = items_for("carol", "CAROL-DEL-55e1")
    vecs = vectors_for(rng, texts)
    ids = store.add("carol", texts, vecs)
    gone, kept = [ids[1], ids[5]], [ids[0], ids[2]]
    store.delete("carol", gone)
    # Item 5 is the long one: its vectors are the rows from 5 on, one for each part.
    needles = [b"CAROL-DEL-55e1-1", b"CAROL-DEL-55e1-long", *pieces(vecs[1])]
    needles += [p for v in vecs[5:] for p in pieces(v)]
    searched = assert_gone(db, needles)
    data = raw_bytes(db)
    assert b"CAROL-DEL-55e1-0" in data and b"CAROL-DEL-55e1-2" in data
    assert sum(p in data for p in pieces(vecs[0])) >= len(pieces(vecs[0])) - 1
    assert {i.id for i in store.items("carol")} >= set(kept)
    assert store.vector_count("carol") == 4
    report_counts(f"{searched:,} bytes searched after deleting 2 items: 0 found")


def test_erasure_reaches_the_sqlite_vec_shadow_tables(store: HistoryStore):
    """The vectors live in sqlite-vec's chunk tables: the erased vector's bytes must not
    remain in any chunk (old sqlite-vec releases left them there; the store zeroes them)."""
    rng = np.random.default_rng(9)
    vecs = distinctive(rng, 3)
    ids = store.add("dave", ["a DAVE-1", "b DAVE-2", "c DAVE-3"], vecs)
    store.delete("dave", [ids[1]])
    conn = store._conn
    tables = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'history_vec_%'"
        )
    ]
    assert any("vector_chunks" in t for t in tables)
    for table in tables:
        for row in conn.execute(f'SELECT * FROM "{table}"'):
            for value in row:
                if isinstance(value, bytes):
                    assert vecs[1].tobytes() not in value, table
    assert any(
        vecs[0].tobytes() in (v or b"")
        for t in tables
        if "vector_chunks" in t
        for (v,) in conn.execute(f'SELECT vectors FROM "{t}"')
    )


def test_erasure_through_the_cli(default_bundle: Path, isolated_home: Path, report_counts):
    from click.testing import CliRunner

    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli, ["--bundle", str(default_bundle), *args])
        assert result.exit_code == 0, result.output
        return result.output

    run("add", "erin", "ERIN-PRIVATE-a1b2 my bank PIN is not here", "ERIN-PRIVATE-c3d4 dentist")
    run("add", "frank", "FRANK-STAYS-0000 lunch at noon")
    db = isolated_home / "history.db"
    assert b"ERIN-PRIVATE-a1b2" in raw_bytes(db)
    run("forget", "erin", "--yes")
    searched = assert_gone(db, [b"ERIN-PRIVATE-a1b2", b"ERIN-PRIVATE-c3d4", b"erin"])
    assert b"FRANK-STAYS-0000" in raw_bytes(db)
    report_counts(f"{searched:,} bytes searched after `edge-pllm forget`: 0 found")


def remembered(store: HistoryStore, user: str, marker: str, vec: np.ndarray) -> str:
    """A remembered turn with its answer (a long one: overflow pages), as memory keeps them."""
    answer_id = f"chatcmpl-{marker}-ID"
    turn = NewItem(
        f"{marker}-TURN what shall I bake", kind="turn", metadata={"answer_id": answer_id}
    )
    answer = f"{marker}-ANSWER try rye " + "crumb and crust " * 1200
    store.remember(user, turn, vec, answer_id=answer_id, answer=answer, strategy="rag")
    return answer_id


def test_forget_erases_remembered_turns_answers_and_feedback(store: HistoryStore, report_counts):
    """Memory's records (a remembered turn, the answer kept for feedback, a rating, an edit
    with its link to the request) are erased by forget like any history item."""
    db = Path(store.path)
    rng = np.random.default_rng(11)
    turn_vec, edit_vec, ivan_vec = distinctive(rng, 3)
    answer_id = remembered(store, "hal-user-77", "HAL-8e2c", turn_vec)
    store.add_feedback("hal-user-77", answer_id, rating=1)
    edit = NewItem(
        "HAL-8e2c-EDIT rye on Sundays",
        kind="edit",
        metadata={"answer_id": answer_id, "request": "HAL-8e2c-TURN what shall I bake"},
    )
    store.add_feedback("hal-user-77", answer_id, edit=edit, vector=edit_vec)
    remembered(store, "ivan", "IVAN-0b7d", ivan_vec)
    needles = [
        b"HAL-8e2c-TURN",
        b"HAL-8e2c-ANSWER",
        b"HAL-8e2c-EDIT",
        b"HAL-8e2c-ID",
        b"hal-user-77",
    ]
    before = raw_bytes(db)
    assert all(n in before for n in needles), "the test must see the records before erasing"
    needles += [*pieces(turn_vec), *pieces(edit_vec)]

    assert store.forget("hal-user-77") == 2
    searched = assert_gone(db, needles)
    after = raw_bytes(db)
    assert b"IVAN-0b7d-TURN" in after and b"IVAN-0b7d-ANSWER" in after
    assert [a.user for a in store.answers("ivan")] == ["ivan"]
    conn = store._conn
    assert conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 1
    assert conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 0
    assert store.integrity()["integrity_check"] == "ok"
    report_counts(f"{searched:,} bytes searched after forgetting memory's records: 0 found")


def test_deleting_a_remembered_turn_erases_its_answer(store: HistoryStore):
    rng = np.random.default_rng(12)
    answer_id = remembered(store, "jo", "JO-44aa", distinctive(rng, 1))
    store.add_feedback("jo", answer_id, rating=-1)
    turn = store.answer("jo", answer_id).turn_id
    store.delete("jo", [turn])
    assert_gone(Path(store.path), [b"JO-44aa-TURN", b"JO-44aa-ANSWER", b"JO-44aa-ID"])
    assert store.answers("jo") == []
    assert store._conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 0


def test_secure_delete_is_on_for_every_connection(store: HistoryStore):
    assert store._conn.execute("PRAGMA secure_delete").fetchone()[0] == 1


def test_a_reader_in_another_connection_delays_but_does_not_defeat_erasure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """With another connection in an open read, the log cannot be truncated at once; the
    next checkpoint after that reader is done clears it."""
    monkeypatch.setattr(edge_db, "CHECKPOINT_TIMEOUT_MS", 200)
    db = tmp_path / "h.db"
    rng = np.random.default_rng(3)
    with HistoryStore(db, DIM) as writer, HistoryStore(db, DIM) as reader:
        writer.add("gina", ["GINA-WAL-77 text"], distinctive(rng, 1))
        reader._conn.execute("BEGIN")
        reader._conn.execute("SELECT COUNT(*) FROM history").fetchone()  # holds a snapshot
        writer.forget("gina")  # waits up to CHECKPOINT_TIMEOUT_MS for the reader
        assert writer.checkpoint() is False  # the reader still needs the old pages
        reader._conn.execute("COMMIT")
        assert writer.checkpoint() is True
        assert_gone(db, [b"GINA-WAL-77"])


def test_secure_delete_cost_is_small(tmp_path: Path, report_counts):
    """secure_delete zeroes freed content: measure delete throughput with it on vs off."""
    timings = {}
    for mode in ("ON", "OFF"):
        with HistoryStore(tmp_path / f"{mode}.db", DIM) as s:
            s._conn.execute(f"PRAGMA secure_delete = {mode}")
            rng = np.random.default_rng(0)
            ids = s.add("u", [f"item {i} " + "x" * 400 for i in range(300)], distinctive(rng, 300))
            started = time.perf_counter()
            for chunk in range(0, 300, 10):
                s.delete("u", ids[chunk : chunk + 10])
            timings[mode] = time.perf_counter() - started
    report_counts(
        f"deleting 300 items in 30 calls: secure_delete ON {timings['ON'] * 1000:.0f} ms, "
        f"OFF {timings['OFF'] * 1000:.0f} ms"
    )
    assert timings["ON"] < 5 * timings["OFF"] + 0.5


def test_a_long_imported_item_leaves_with_its_file_and_every_part(store: HistoryStore):
    """A file's long item has a vector for each part: when the file goes (or changes),
    every one of them is erased with the item's text."""
    db = Path(store.path)
    rng = np.random.default_rng(13)
    paragraphs = (f"paragraph {i} of private words " * 9 for i in range(20))
    note = "JUNE-NOTE-77aa " + "\n\n".join(paragraphs)
    vecs = vectors_for(rng, [note])
    assert len(vecs) > 5
    source = SourceFile("/notes/june.md", 10, 1, "0" * 64)
    store.import_source("june", source, [note], vecs)
    store.add("june", ["kept JUNE-KEEP-1b"], distinctive(rng, 1))
    store.checkpoint()
    needles = [b"JUNE-NOTE-77aa", *(p for v in vecs for p in pieces(v))]
    before = raw_bytes(db)
    assert sum(n in before for n in needles) >= len(needles) - len(vecs)
    assert store.drop_source("june", "/notes/june.md") == 1
    assert_gone(db, needles)
    assert b"JUNE-KEEP-1b" in raw_bytes(db) and store.vector_count("june") == 1
