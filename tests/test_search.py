"""Search in memory (edge_pllm/storage/search.py through HistoryStore) on real SQLite + sqlite-vec:
exact against a brute force, isolated between users, erased at once, bounded in bytes."""

from __future__ import annotations

import mmap
import weakref
from pathlib import Path

import numpy as np
import pytest

from edge_pllm.errors import InvalidInputError, UnknownUserError
from edge_pllm.storage import search
from edge_pllm.storage.store import HistoryStore

DIM = 8
TOL = 1e-6  # the store normalizes in float32, the reference in float64


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def reference(vectors: dict[int, np.ndarray], query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Exact cosine top k by brute force in float64, ties in id order."""
    ids = sorted(vectors)
    if not ids:
        return []
    rows = np.array([vectors[i] for i in ids], dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1)
    rows = np.divide(rows, norms[:, None], out=np.zeros_like(rows), where=norms[:, None] > 0)
    q = np.asarray(query, dtype=np.float64)
    q = q / np.linalg.norm(q) if q.any() else q
    dist = 1 - np.einsum("ij,j->i", rows, q)
    order = sorted(range(len(ids)), key=lambda j: (dist[j], ids[j]))[:k]
    return [(ids[j], float(dist[j])) for j in order]


def assert_exact(store: HistoryStore, user: str, vectors: dict[int, np.ndarray], q, k: int):
    given = np.array(q, copy=True)
    hits = store.search(user, q, k)
    np.testing.assert_array_equal(q, given)  # the caller's query is left as it was
    ref = reference(vectors, q, k)
    assert len(hits) == len(ref) == min(k, len(vectors))
    assert all(h.item.user == user for h in hits)
    got = [h.distance for h in hits]
    np.testing.assert_allclose(got, [d for _, d in ref], atol=TOL)
    assert got == sorted(got)
    kth = ref[-1][1] if ref else 0.0
    all_d = dict(reference(vectors, q, len(vectors)))
    for h in hits:  # each hit is where it belongs, up to float32 rounding
        assert abs(all_d[h.item.id] - h.distance) < TOL and all_d[h.item.id] <= kth + TOL
    assert len({h.item.id for h in hits}) == len(hits)


@pytest.fixture
def store(tmp_path: Path):
    with HistoryStore(tmp_path / "h.db", DIM) as s:
        yield s


def add(store: HistoryStore, user: str, vecs: np.ndarray, tag: str = "") -> dict[int, np.ndarray]:
    texts = [f"{user} {tag}{i}" for i in range(len(vecs))]
    return dict(zip(store.add(user, texts, vecs), vecs, strict=True))


def knn_buffer(store: HistoryStore, user: str) -> search.Vectors:
    uid = store._user_id(user)
    matrix = store._cache.get(uid, search.KNN)
    assert matrix is not None, "the user's matrix is in memory"
    return matrix


def test_exact_on_random_data_for_every_k(store: HistoryStore):
    rng = np.random.default_rng(0)
    vectors = add(store, "alice", unit(rng, 2500))  # three vec0 chunks
    for q in unit(rng, 30):
        for k in (1, 5, 37):
            assert_exact(store, "alice", vectors, q, k)
    few = add(store, "bob", unit(rng, 7))
    for k in (7, 8, 4096, 10**9):  # k > n: all of them, nearest first
        assert_exact(store, "bob", few, unit(rng, 1)[0], k)
    assert store.cached_bytes() > 0


def test_ties_are_exact_and_in_id_order(tmp_path: Path):
    rng = np.random.default_rng(1)
    dim = 384  # wide rows: float32 BLAS rounds equal rows differently at the matrix's end
    vecs = rng.normal(size=(1031, dim)).astype(np.float32)
    same = vecs[3]
    vecs[[500, 1027, 1028, 1029, 1030]] = same
    with HistoryStore(tmp_path / "t.db", dim) as store:
        vectors = dict(
            zip(store.add("alice", [f"a{i}" for i in range(1031)], vecs), vecs, strict=True)
        )
        tied = sorted(i for i, v in vectors.items() if np.array_equal(v, same))
        for k in (2, 6, 9):
            hits = store.search("alice", same, k)
            assert [h.item.id for h in hits[:6]] == tied[: min(k, 6)]
            assert len({h.distance for h in hits[:6]}) == 1
            assert_exact(store, "alice", vectors, same, k)
        # A query of zeros has no direction: every item at distance 1, lowest ids first.
        hits = store.search("alice", np.zeros(dim, dtype=np.float32), 4)
        assert [(h.item.id, h.distance) for h in hits] == [(i, 1.0) for i in sorted(vectors)[:4]]


def test_exact_after_adds_and_deletes_here_and_elsewhere(store: HistoryStore):
    rng = np.random.default_rng(2)
    vectors = add(store, "alice", unit(rng, 300))
    store.search("alice", unit(rng, 1)[0], 3)
    matrix = knn_buffer(store, "alice")
    for turn in range(20):  # a chat with memory on: one item a turn, appended, not reread
        vectors |= add(store, "alice", unit(rng, 1), tag=f"turn{turn}-")
        assert_exact(store, "alice", vectors, unit(rng, 1)[0], 5)
    assert knn_buffer(store, "alice") is matrix and matrix.n == 320
    gone = list(vectors)[::7]
    store.delete("alice", gone)
    for i in gone:
        del vectors[i]
    for q in unit(rng, 10):
        assert_exact(store, "alice", vectors, q, 10)
    with HistoryStore(store.path, DIM) as other:  # another connection: read again
        vectors |= add(other, "alice", unit(rng, 40), tag="other-")
        for q in unit(rng, 10):
            assert_exact(store, "alice", vectors, q, 10)
        mine = sorted(vectors)[:5]
        other.delete("alice", mine)
        for i in mine:
            del vectors[i]
        for q in unit(rng, 10):
            assert_exact(store, "alice", vectors, q, 10)
    # Items that already exist are not added twice, nor appended twice.
    again = store.add("alice", [store.items("alice", limit=1)[0].text], unit(rng, 1))
    assert again[0] in vectors and knn_buffer(store, "alice").n == len(vectors)


def test_users_never_see_each_other(store: HistoryStore):
    rng = np.random.default_rng(3)
    alice, bob = add(store, "alice", unit(rng, 50)), add(store, "bob", unit(rng, 60))
    for vec in bob.values():  # bob's exact vectors, searched in alice's history
        hits = store.search("alice", vec, 10)
        assert {h.item.user for h in hits} == {"alice"} and {h.item.id for h in hits} <= set(alice)
    for vec in list(alice.values())[:10]:
        assert_exact(store, "bob", bob, vec, 60)
    assert set(knn_buffer(store, "alice").ids) == set(alice)
    assert set(knn_buffer(store, "bob").ids) == set(bob)
    store.delete("alice", list(alice))  # no items left: nothing found, and nothing of bob's
    assert store.search("alice", next(iter(bob.values())), 5) == []


def backing_map(array: np.ndarray) -> mmap.mmap:
    base = array
    while not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else base.base
    return base


@pytest.mark.parametrize("erase", ["delete", "forget"])
def test_erasing_zeroes_the_users_matrices_at_once(store: HistoryStore, erase: str):
    rng = np.random.default_rng(4)
    alice = add(store, "alice", unit(rng, 40))
    bob = add(store, "bob", unit(rng, 40))
    store.search("alice", unit(rng, 1)[0], 3)
    store.search("bob", unit(rng, 1)[0], 3)
    knn_rows = knn_buffer(store, "alice")._rows  # the whole buffer, kept past the drop
    ids, handed_out = store.vectors("alice")  # what a Persona-Plug request holds
    bob_rows = knn_buffer(store, "bob").rows.copy()
    assert knn_rows.any() and handed_out.any()
    if erase == "delete":
        store.delete("alice", [ids[0]])
    else:
        store.forget("alice")
    assert not knn_rows.any() and not handed_out.any()  # overwritten with zeros
    np.testing.assert_array_equal(knn_buffer(store, "bob").rows, bob_rows)  # bob's kept
    if erase == "delete":
        del alice[ids[0]]
        assert_exact(store, "alice", alice, unit(rng, 1)[0], 5)
    else:
        with pytest.raises(UnknownUserError):
            store.search("alice", unit(rng, 1)[0], 3)
    assert_exact(store, "bob", bob, unit(rng, 1)[0], 5)


def test_dropped_matrices_leave_no_copy_behind(store: HistoryStore):
    rng = np.random.default_rng(5)
    add(store, "alice", unit(rng, 30))
    store.search("alice", unit(rng, 1)[0], 3)
    knn_rows = knn_buffer(store, "alice")._rows
    _, held = store.vectors("alice")
    kept = held.copy()
    with HistoryStore(store.path, DIM) as other:
        other.add("carol", ["c"], unit(rng, 1))  # another connection commits
    store.search("alice", unit(rng, 1)[0], 3)
    # The search matrix, never handed out, was zeroed; the request's array is left to it...
    assert not knn_rows.any() and knn_buffer(store, "alice")._rows is not knn_rows
    np.testing.assert_array_equal(held, kept)
    assert store.vectors("alice")[1] is not held
    # ... and its memory map is unmapped as soon as the request lets go of it.
    gone = weakref.ref(backing_map(held))
    del held
    assert gone() is None
    knn_rows = knn_buffer(store, "alice")._rows
    store.clear_cache()  # as closing does: zeroed and dropped
    assert not knn_rows.any() and store.cached_bytes() == 0


def test_over_the_budget_sqlite_vec_answers_the_same(tmp_path: Path):
    rng = np.random.default_rng(6)
    one_user = search.Vectors.size(200, DIM)
    with HistoryStore(tmp_path / "b.db", DIM, cache_budget=one_user) as store:
        small = add(store, "small", unit(rng, 200))
        big = add(store, "big", unit(rng, 1500))
        for q in unit(rng, 20):
            assert_exact(store, "big", big, q, 7)  # sqlite-vec in the file
            assert_exact(store, "small", small, q, 7)  # in memory
        assert store.cached_bytes("big") == 0 and store.cached_bytes("nobody") == 0
        assert 0 < store.cached_bytes("small") == store.cached_bytes() <= store.cache_budget
        # Zeros: no direction, distance 1, as in memory.
        hits = store.search("big", np.zeros(DIM, dtype=np.float32), 3)
        assert [(h.item.id, h.distance) for h in hits] == [(i, 1.0) for i in sorted(big)[:3]]
        # Growing past the budget drops the matrix; search goes on in the file.
        small_rows = knn_buffer(store, "small")._rows
        small |= add(store, "small", unit(rng, 5), tag="more")
        assert store._cache.get(store._user_id("small"), search.KNN) is None
        assert not small_rows.any()
        assert_exact(store, "small", small, unit(rng, 1)[0], 7)
        # A smaller budget evicts at once; zero keeps nothing and still answers.
        store.cache_budget = 0
        assert store.cached_bytes() == 0
        assert_exact(store, "big", big, unit(rng, 1)[0], 3)
        assert store.vectors("small")[0] == [i for i in sorted(small)]


def test_least_recently_used_matrix_is_evicted_and_zeroed(tmp_path: Path):
    rng = np.random.default_rng(7)
    with HistoryStore(tmp_path / "l.db", DIM, cache_budget=search.Vectors.size(100, DIM)) as store:
        alice, bob = add(store, "alice", unit(rng, 100)), add(store, "bob", unit(rng, 100))
        store.search("alice", unit(rng, 1)[0], 3)
        alice_rows = knn_buffer(store, "alice")._rows
        store.search("bob", unit(rng, 1)[0], 3)
        assert store._cache.get(store._user_id("alice"), search.KNN) is None
        assert not alice_rows.any() and store.cached_bytes() <= store.cache_budget
        assert_exact(store, "alice", alice, unit(rng, 1)[0], 5)
        assert_exact(store, "bob", bob, unit(rng, 1)[0], 5)


def test_the_chunk_reader_matches_vec0_rows(store: HistoryStore, monkeypatch):
    rng = np.random.default_rng(8)
    vectors = add(store, "alice", unit(rng, 2100))
    add(store, "bob", unit(rng, 900))  # chunks of both users, interleaved
    store.delete("alice", list(vectors)[5:1500:3])  # holes in the chunks
    uid = store._user_id("alice")
    n = store.count("alice")
    fast = search.Vectors(n, DIM)
    assert store._read_chunks(uid, fast)
    rows = store._conn.execute(
        "SELECT rowid, embedding FROM history_vec WHERE user_id = ?", (uid,)
    ).fetchall()
    by_id = {i: np.frombuffer(b, np.float32) for i, b in rows}
    assert fast.n == n == len(by_id)
    for i, row in zip(fast.ids, fast.rows, strict=True):
        np.testing.assert_array_equal(row, by_id[int(i)])
    # Were the chunks ever unreadable, the rows through vec0 give the same answers.
    monkeypatch.setattr(HistoryStore, "_read_chunks", lambda self, uid, matrix: False)
    with HistoryStore(store.path, DIM) as slow:
        remaining = {i: v for i, v in vectors.items() if i in by_id}
        for q in unit(rng, 5):
            assert_exact(slow, "alice", remaining, q, 9)


def test_a_stored_vector_of_zeros_is_at_distance_one(store: HistoryStore):
    rng = np.random.default_rng(9)
    vecs = unit(rng, 5)
    vecs[2] = 0
    vectors = add(store, "alice", vecs)
    hits = store.search("alice", vecs[0], 5)
    assert dict((h.item.id, h.distance) for h in hits)[list(vectors)[2]] == 1.0
    assert_exact(store, "alice", vectors, vecs[0], 5)


@pytest.mark.parametrize("budget", [-1, 1.5, "256", True])
def test_a_bad_budget_is_refused_and_changes_nothing(tmp_path: Path, budget):
    with pytest.raises(InvalidInputError, match="cache_budget") as err:
        HistoryStore(tmp_path / "x.db", DIM, cache_budget=budget)
    assert err.value.field == "cache_budget" and not (tmp_path / "x.db").exists()
    with HistoryStore(tmp_path / "y.db", DIM, cache_budget=1000) as store:
        with pytest.raises(InvalidInputError, match="cache_budget"):
            store.cache_budget = budget
        assert store.cache_budget == 1000


def test_personal_llm_passes_its_budget_to_the_store(default_bundle: Path, tmp_path: Path):
    from edge_pllm import PersonalLLM

    with pytest.raises(InvalidInputError, match="cache_budget"):
        PersonalLLM(home=tmp_path / "new", cache_budget=-1)
    assert not (tmp_path / "new").exists()  # refused before a bundle is built

    with PersonalLLM(default_bundle, home=tmp_path, cache_budget=0) as pllm:
        pllm.add("ann", ["one note", "another note"])
        assert pllm.store.cache_budget == 0
        assert len(pllm.store.search("ann", pllm.embedder.embed_one("note"), 2)) == 2
        assert pllm.store.cached_bytes() == 0


def test_the_default_budget_is_a_quarter_of_the_memory_at_least_the_floor(
    tmp_path: Path, monkeypatch
):
    from edge_pllm import ram

    ram_now = ram.usable_ram()
    assert ram_now is None or ram_now > 0
    with HistoryStore(tmp_path / "d.db", DIM) as store:
        expected = search.CACHE_FLOOR if ram_now is None else max(search.CACHE_FLOOR, ram_now // 4)
        assert store.cache_budget == expected
    monkeypatch.setattr(search, "usable_ram", lambda: 8 * 2**30)  # a laptop
    assert search.default_cache_budget() == 2 * 2**30  # a million 384-float vectors fit
    assert search.default_cache_budget() > search.Vectors.size(1_000_000, 384)
    monkeypatch.setattr(search, "usable_ram", lambda: 512 * 2**20)  # a small device
    assert search.default_cache_budget() == search.CACHE_FLOOR
    monkeypatch.setattr(search, "usable_ram", lambda: None)  # the OS does not say
    assert search.default_cache_budget() == search.CACHE_FLOOR


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"memory.max": "4294967296\n"}, 4 * 2**30),  # cgroup v2, docker run --memory 4g
        ({"memory.max": "max\n"}, None),
        ({"memory/memory.limit_in_bytes": "2147483648\n"}, 2 * 2**30),  # v1
        ({"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),  # v1: no limit
        ({}, None),
    ],
)
def test_a_containers_memory_limit_bounds_the_memory(tmp_path: Path, monkeypatch, files, expected):
    from edge_pllm import ram

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(ram, "SYSFS_CGROUP", tmp_path)
    assert ram.cgroup_ram_limit() == expected
    machine = ram.machine_ram()
    bounds = [b for b in (machine, expected) if b is not None]
    assert ram.usable_ram() == (min(bounds) if bounds else None)
