"""Guarantee 3, crash safety: a process killed (SIGKILL) in the middle of batched ingest,
deletes and forgets, again and again on the same database, leaves it intact every time:
`PRAGMA integrity_check` is ok, every item has its text row and its vectors (a long one's
parts too) or neither, every batch is there whole or not at all, and nothing reported as
committed is lost.

The child (tests/security_workers.py) prints a line after each commit, and a line *before*
each change that removes items; the parent kills it at a random moment and then checks.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_pllm.storage.store import HistoryStore

ROOT = Path(__file__).resolve().parents[1]
DIM = 64


class Ledger:
    """What the children reported: batch tag -> (user, size, state)."""

    PRESENT, MAYBE, ABSENT = "present", "maybe", "absent"

    def __init__(self) -> None:
        self.batches: dict[str, list] = {}

    def read(self, lines: list[str]) -> None:
        for line in lines:
            word, *rest = line.split()
            if word == "added":
                tag, user, n = rest
                self.batches[tag] = [user, int(n), self.PRESENT]
            elif word == "deleting":
                self.batches[rest[0]][2] = self.MAYBE
            elif word == "deleted":
                self.batches[rest[0]][2] = self.ABSENT
            elif word in ("forgetting", "forgot"):
                state = self.MAYBE if word == "forgetting" else self.ABSENT
                for entry in self.batches.values():
                    if entry[0] == rest[0] and entry[2] != self.ABSENT:
                        entry[2] = state

    def settle(self, found: dict[str, int]) -> None:
        """After a check, a 'maybe' batch is whatever the database says it is."""
        for tag, entry in self.batches.items():
            if entry[2] == self.MAYBE:
                entry[2] = self.PRESENT if found.get(tag) else self.ABSENT


def check_database(db: Path, ledger: Ledger) -> dict[str, int]:
    """Open (which recovers the WAL) and check everything; return batch tag -> rows found."""
    with HistoryStore(db, DIM) as store:
        conn = store._conn
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = {r[0]: r[1] for r in conn.execute("SELECT id, user_id FROM history")}
        # A long item's further parts: their vectors are named by item_parts (negative ids).
        rows |= {
            r[0]: r[1]
            for r in conn.execute(
                "SELECT p.vector_id, h.user_id FROM item_parts p"
                " JOIN history h ON h.id = p.item_id WHERE p.vector_id < 0"
            )
        }
        vecs = {r[0]: r[1] for r in conn.execute("SELECT rowid, user_id FROM history_vec")}
        assert rows == vecs, "an item or part lost its vector, or a vector its item or part"
        assert conn.execute(
            "SELECT COUNT(*) FROM item_parts p JOIN history h ON h.id = p.item_id"
            " WHERE p.user_id != h.user_id"
        ).fetchone() == (0,)
        users = {r[0] for r in conn.execute("SELECT id FROM users")}
        assert set(rows.values()) <= users
        found: dict[str, int] = {}
        sizes: dict[str, int] = {}
        for meta, count in conn.execute("SELECT metadata, COUNT(*) FROM history GROUP BY 1"):
            m = json.loads(meta)
            found[m["batch"]] = count
            sizes[m["batch"]] = m["n"]
        for tag, count in found.items():
            assert count == sizes[tag], f"batch {tag} is torn: {count} of {sizes[tag]} items"
        for tag, (_, n, state) in ledger.batches.items():
            if state == Ledger.PRESENT:
                assert found.get(tag) == n, f"committed batch {tag} was lost"
            elif state == Ledger.ABSENT:
                assert tag not in found, f"deleted batch {tag} came back"
        return found


def kill_loop(db: Path, kills: int, budget_s: float, seed: int) -> tuple[int, int, int]:
    """Start, kill, check, `kills` times (or until the time budget is spent)."""
    rng = random.Random(seed)
    ledger = Ledger()
    survived = committed_lines = 0
    deadline = time.monotonic() + budget_s
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for round_ in range(kills):
        if time.monotonic() > deadline:
            break
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.security_workers",
                "ingest",
                str(db),
                str(round_),
                str(DIM),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            first = child.stdout.readline()
            assert first == "ready\n", first + child.stderr.read()
            time.sleep(rng.uniform(0.0, 0.35))
            assert child.poll() is None, child.stderr.read()  # it must still be working
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            lines = child.stdout.read().splitlines()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
            child.stderr.close()
        assert child.returncode == -signal.SIGKILL
        ledger.read(lines)
        committed_lines += sum(1 for line in lines if line.startswith("added"))
        ledger.settle(check_database(db, ledger))
        survived += 1
    present = sum(1 for e in ledger.batches.values() if e[2] == Ledger.PRESENT)
    return survived, committed_lines, present


def test_sigkill_during_ingest_fast(tmp_path: Path, report_counts):
    survived, committed, present = kill_loop(tmp_path / "crash.db", kills=8, budget_s=20, seed=1)
    assert survived >= 5 and committed > 0
    report_counts(f"{survived} SIGKILLs survived, {committed} batches committed, {present} kept")


@pytest.mark.slow
def test_sigkill_during_ingest_many_times(tmp_path: Path, report_counts):
    started = time.monotonic()
    survived, committed, present = kill_loop(tmp_path / "crash.db", kills=60, budget_s=150, seed=2)
    assert survived >= 50, f"only {survived} kills fit in the time budget"
    report_counts(
        f"{survived} SIGKILLs survived in {time.monotonic() - started:.0f} s, "
        f"{committed} batches committed, {present} kept"
    )
