"""Guarantee 8, concurrency on one database: several processes (spawned, each with its own
connection) create the store at the same moment, then add batches to their own user and to
a shared one, search, list and delete, all at once. Nothing committed is lost, no batch is
torn, deleted batches stay deleted, and no "database is locked" (or any other error)
escapes: WAL lets readers run beside the one writer, and writers queue on the busy timeout.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from edge_pllm.storage.store import HistoryStore

from .security_workers import concurrent_worker, open_and_add

DIM = 32


def run_workers(db: Path, workers: int, rounds: int, passphrase: str | None = None) -> dict:
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 1.0 + 0.5 * workers  # after every process has started
    with ctx.Pool(workers) as pool:
        results = pool.starmap(
            concurrent_worker,
            [(str(db), DIM, w, rounds, 100 + w, passphrase, start_at) for w in range(workers)],
        )
    errors = [e for r in results for e in r["errors"]]
    assert errors == [], errors[0]
    assert all(r["span"][1] > start_at for r in results)
    first_done = min(r["span"][1] for r in results)
    assert first_done - start_at > 0.2 or rounds < 50  # they really overlapped
    elapsed = max(r["span"][1] for r in results) - start_at
    committed = {t: b for r in results for t, b in r["committed"].items()}
    deleted = {t for r in results for t in r["deleted"]}
    with HistoryStore(db, DIM, passphrase=passphrase) as store:
        conn = store._conn
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = dict(conn.execute("SELECT id, user_id FROM history").fetchall())
        vecs = dict(conn.execute("SELECT rowid, user_id FROM history_vec").fetchall())
        assert rows == vecs
        found: dict[str, set[int]] = {}
        for item_id, meta in conn.execute("SELECT id, metadata FROM history"):
            found.setdefault(json.loads(meta)["batch"], set()).add(item_id)
        listed = {u.name: {i.id for i in store.items(u.name, limit=None)} for u in store.users()}
        for tag, (user, ids) in committed.items():
            assert found.get(tag) == set(ids), f"batch {tag} of {user} lost or torn"
            assert listed[user] >= set(ids)
        for tag in deleted:
            assert tag not in found, f"deleted batch {tag} is back"
        assert set(found) == set(committed)
    return {
        "workers": workers,
        "batches": len(committed) + len(deleted),
        "items": len(rows),
        "reads": sum(r["reads"] for r in results),
        "seconds": elapsed,
    }


def test_processes_share_one_store_fast(tmp_path: Path, report_counts):
    stats = run_workers(tmp_path / "shared.db", workers=3, rounds=40)
    report_counts(
        f"{stats['workers']} processes, {stats['batches']} write batches and {stats['reads']} "
        f"reads at once in {stats['seconds']:.1f} s: 0 lost, 0 'database is locked'"
    )


@pytest.mark.slow
def test_processes_share_one_store_many(tmp_path: Path, report_counts):
    stats = run_workers(tmp_path / "shared.db", workers=6, rounds=300)
    report_counts(
        f"{stats['workers']} processes, {stats['batches']} write batches and {stats['reads']} "
        f"reads at once in {stats['seconds']:.1f} s: 0 lost, 0 'database is locked'"
    )


def test_encrypted_store_is_shared_too(tmp_path: Path):
    pytest.importorskip("sqlcipher3")
    run_workers(tmp_path / "secret.db", workers=2, rounds=10, passphrase="s3cret phrase")


@pytest.mark.parametrize("passphrase", [None, "s3cret phrase"])
def test_processes_creating_a_new_store_together(tmp_path: Path, passphrase: str | None):
    """Regression: switching a brand-new database to WAL answered 'database is locked' to
    the processes that lost the race (SQLite does not use the busy handler there)."""
    if passphrase:
        pytest.importorskip("sqlcipher3")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        for trial in range(2 if passphrase else 4):  # a key derivation costs ~0.2 s
            db = tmp_path / f"new{trial}.db"
            start_at = time.time() + (2.0 if trial == 0 else 0.3)
            errors = pool.starmap(open_and_add, [(str(db), DIM, passphrase, start_at)] * 4)
            assert [e for e in errors if e] == []
            with HistoryStore(db, DIM, passphrase=passphrase) as store:
                assert store.count("u") == 4
