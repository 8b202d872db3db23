"""Child processes for the crash-safety and concurrency tests (tests/test_security_*.py).

Run as `python -m tests.security_workers ingest DB SEED DIM` for the crash test: it opens
the store and ingests batches forever, printing a line *before* it starts a change that may
remove committed items and *after* each change is committed, until it is killed.
"""

from __future__ import annotations

import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from edge_pllm.storage.items import NewItem
from edge_pllm.storage.parts import texts_to_embed
from edge_pllm.storage.store import HistoryStore

CRASH_USERS = ("ann", "bo", "cy")


def _batch(tag: str, n: int, rng: random.Random, long_text: bool) -> list[NewItem]:
    items = []
    for i in range(n):
        body = "lorem ipsum " * rng.randint(0, 300 if long_text else 8)  # overflow pages too
        items.append(NewItem(text=f"{tag}/{i} {body}", metadata={"batch": tag, "n": n}))
    return items


def ingest_forever(db_path: str, seed: int, dim: int) -> None:
    """Batched ingest with deletes and forgets, reporting each commit on stdout."""
    rng = random.Random(seed)
    vectors = np.random.default_rng(seed)
    out = sys.stdout
    with HistoryStore(db_path, dim) as store:
        out.write("ready\n")
        out.flush()
        batches: dict[str, tuple[str, list[int]]] = {}
        number = 0
        while True:
            number += 1
            roll = rng.random()
            if roll < 0.1 and batches:
                tag = rng.choice(sorted(batches))
                user, ids = batches.pop(tag)
                out.write(f"deleting {tag}\n")
                out.flush()
                store.delete(user, ids)
                out.write(f"deleted {tag}\n")
            elif roll < 0.13:
                user = rng.choice(CRASH_USERS)
                if not store.has_user(user):
                    continue
                out.write(f"forgetting {user}\n")
                out.flush()
                store.forget(user)
                batches = {t: b for t, b in batches.items() if b[0] != user}
                out.write(f"forgot {user}\n")
            else:
                tag = f"s{seed}b{number}"
                n = rng.randint(1, 48)
                user = rng.choice(CRASH_USERS)
                items = _batch(tag, n, rng, long_text=rng.random() < 0.3)
                k = len(texts_to_embed(i.text for i in items))  # long ones: parts too
                vecs = vectors.normal(size=(k, dim)).astype(np.float32)
                ids = store.add(user, items, vecs)
                batches[tag] = (user, ids)
                out.write(f"added {tag} {user} {n}\n")
            out.flush()


def concurrent_worker(
    db_path: str,
    dim: int,
    worker: int,
    rounds: int,
    seed: int,
    passphrase: str | None = None,
    start_at: float = 0.0,
) -> dict[str, Any]:
    """One of several processes adding to and reading the same store at once.

    All workers wait for the wall-clock time `start_at`, then open the store (racing to
    create it) and work. Returns what it committed (batch tag -> user, ids), what it
    deleted, how many reads it made, when it worked, and every exception it saw."""
    time.sleep(max(0.0, start_at - time.time()))
    rng = random.Random(seed)
    vectors = np.random.default_rng(seed)
    committed: dict[str, tuple[str, list[int]]] = {}
    deleted: list[str] = []
    errors: list[str] = []
    reads = 0
    started = time.perf_counter()
    try:
        store = HistoryStore(db_path, dim, passphrase=passphrase)  # migrations race here
    except Exception:
        return {"committed": {}, "deleted": [], "reads": 0, "errors": [traceback.format_exc()]}
    with store:
        for number in range(rounds):
            try:
                user = rng.choice([f"own{worker}", "shared"])
                tag = f"w{worker}r{number}"
                n = rng.randint(1, 24)
                items = [
                    NewItem(text=f"{tag}/{i} from worker {worker}", metadata={"batch": tag})
                    for i in range(n)
                ]
                ids = store.add(user, items, vectors.normal(size=(n, dim)).astype(np.float32))
                committed[tag] = (user, ids)
                # Reads, interleaved with the other processes' writes.
                query = vectors.normal(size=dim).astype(np.float32)
                hits = store.search("shared" if store.has_user("shared") else user, query, k=5)
                assert all(h.item.user in (user, "shared") for h in hits)
                store.items(f"own{worker}" if store.has_user(f"own{worker}") else user, limit=10)
                store.count()
                store.users()
                reads += 4
                if rng.random() < 0.15 and len(committed) > 1:
                    victim = rng.choice(sorted(t for t in committed if t != tag))
                    v_user, v_ids = committed.pop(victim)
                    store.delete(v_user, v_ids)
                    deleted.append(victim)
            except Exception:
                errors.append(traceback.format_exc())
    return {
        "committed": committed,
        "deleted": deleted,
        "reads": reads,
        "errors": errors,
        "seconds": time.perf_counter() - started,
        "span": (start_at, time.time()),
    }


def open_and_add(db_path: str, dim: int, passphrase: str | None, start_at: float) -> str | None:
    """Wait for `start_at`, open (creating) the store and add one item; the error, if any."""
    time.sleep(max(0.0, start_at - time.time()))
    try:
        with HistoryStore(db_path, dim, passphrase=passphrase) as store:
            store.add("u", [f"from {os.getpid()}"], np.ones((1, dim), dtype=np.float32))
    except Exception:
        return traceback.format_exc()
    return None


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "ingest":
        ingest_forever(args[0], int(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
