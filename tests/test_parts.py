"""Long items in parts: where texts are cut, and how the store keeps, finds and erases
an item with several vectors (real SQLite + sqlite-vec)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_pllm.errors import InvalidInputError, ItemNotFoundError
from edge_pllm.storage import db
from edge_pllm.storage.parts import (
    MOST_PARTS,
    part_spans,
    texts_to_embed,
    vector_count,
    vector_texts,
)
from edge_pllm.storage.store import HistoryStore

from .test_store import DIM, unit


@pytest.fixture
def store(tmp_path: Path):
    with HistoryStore(tmp_path / "h.db", DIM) as s:
        yield s


LONG = "\n\n".join(f"Paragraph {i}. " + "Words about the garden shed. " * 12 for i in range(8))


# --- where texts are cut ------------------------------------------------------------------


def test_parts_are_cut_at_boundaries_with_overlap():
    text = " ".join(f"Sentence {i} says something short." for i in range(80))
    spans = part_spans(text, size=300, overlap=80, whole=300)
    parts = [text[a:b] for a, b in spans]
    assert all(len(p) <= 300 for p in parts) and len(parts) > 5
    assert all(p.startswith("Sentence") and p.endswith(".") for p in parts)  # whole sentences
    for before, after in itertools.pairwise(parts):
        assert after.startswith(before.rsplit(". ", 1)[-1])  # its last sentence again
    assert parts[-1].endswith("Sentence 79 says something short.")
    assert part_spans("short") == [] and vector_texts("short") == ["short"]
    assert part_spans("x" * 1000) == [] and vector_count("x" * 1000) == 1  # read whole


def test_a_text_without_boundaries_is_cut_at_the_limit():
    spans = part_spans("x" * 1100)
    assert spans == [(0, 400), (400, 800), (800, 1100)]
    assert vector_texts("x" * 1100) == ["x" * 1100, "x" * 400, "x" * 400, "x" * 300]
    assert vector_count("x" * 1100) == 4
    assert texts_to_embed(["a", "x" * 1100])[:3] == ["a", "x" * 1100, "x" * 400]


def test_paragraphs_are_kept_whole_when_they_fit():
    spans = part_spans(LONG)
    paragraphs = LONG.split("\n\n")
    for a, b in spans:
        assert LONG[a:b].startswith("Paragraph")  # a part starts where a paragraph does
    assert sum(LONG[a:b].count("Paragraph") for a, b in spans) >= len(paragraphs)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from([" ", "\n", "\n\n", ". ", "! ", "\t"]),
            st.text(alphabet="abcdefgh .", min_size=1, max_size=400),
        ),
        max_size=60,
    ),
    st.integers(20, 400),
)
def test_parts_cover_every_visible_character_within_the_limit(pieces, size):
    text = "".join(pieces)
    spans = part_spans(text, size=size, overlap=size // 4, whole=size)
    if len(text) <= size or not text.strip():
        assert spans == []
        return
    covered = np.zeros(len(text), bool)
    for a, b in spans:
        assert 0 <= a < b <= len(text) and b - a <= size
        covered[a:b] = True
    assert all(covered[i] or text[i].isspace() for i in range(len(text)))
    assert all(x[0] < y[0] and x[1] < y[1] for x, y in itertools.pairwise(spans))


# --- the store ----------------------------------------------------------------------------


def add_long(store: HistoryStore, user: str, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    vecs = unit(rng, vector_count(LONG))
    (item_id,) = store.add(user, [LONG], vecs)
    return item_id, vecs


def test_a_long_item_is_one_item_found_by_any_of_its_parts(store: HistoryStore):
    rng = np.random.default_rng(0)
    store.add("ann", [f"short {i}" for i in range(10)], unit(rng, 10))
    item_id, vecs = add_long(store, "ann", rng)
    n = len(vecs)
    assert n > 3
    assert store.count("ann") == 11 and store.vector_count("ann") == 10 + n
    assert [i.text for i in store.items("ann", limit=1)] == [LONG]  # dumps as one
    spans = part_spans(LONG)
    whole = store.search("ann", vecs[0], 3)[0]  # the vector of the whole text
    assert whole.item.id == item_id and whole.part is None and whole.passage.text == LONG
    for number, vec in enumerate(vecs[1:], 1):
        hits = store.search("ann", vec, 3)
        assert hits[0].item.id == item_id and hits[0].distance < 1e-5
        assert hits[0].part is not None and hits[0].part.number == number
        assert hits[0].part.count == n - 1
        assert hits[0].passage.text == LONG[slice(*spans[number - 1])]
        assert hits[0].passage.metadata["passage"] == f"{number}/{n - 1}"
        assert len({h.item.id for h in hits}) == 3  # the item once, with two others
    integrity = store.integrity()
    assert integrity["parts"] == n - 1 and integrity["parts_without_vector"] == 0


def test_search_in_the_file_finds_the_same_parts(store: HistoryStore):
    rng = np.random.default_rng(1)
    store.add("ann", [f"short {i}" for i in range(20)], unit(rng, 20))
    add_long(store, "ann", rng)
    add_long(store, "bob", rng)  # another user's parts are never found for ann
    queries = unit(rng, 12)
    in_memory = [[(h.item.id, h.part) for h in store.search("ann", q, 4)] for q in queries]
    store.cache_budget = 0  # sqlite-vec's KNN in the file from now on
    in_file = [[(h.item.id, h.part) for h in store.search("ann", q, 4)] for q in queries]
    assert in_file == in_memory
    ann = {i.id for i in store.items("ann")}
    for q in queries:  # all of ann's 21 items, each once, and nothing of bob's
        assert sorted(h.item.id for h in store.search("ann", q, 30)) == sorted(ann)


def test_k_distinct_items_even_when_one_items_parts_are_nearest(store: HistoryStore):
    rng = np.random.default_rng(2)
    item_id, vecs = add_long(store, "ann", rng)
    store.add("ann", ["other one", "other two"], unit(rng, 2))
    query = vecs.mean(axis=0)  # nearer every part of the long item than the others
    hits = store.search("ann", query, 3)
    assert hits[0].item.id == item_id and len({h.item.id for h in hits}) == 3


def test_one_vector_for_a_long_item_is_refused_and_nothing_is_stored(store: HistoryStore):
    rng = np.random.default_rng(3)
    store.add("ann", ["kept"], unit(rng, 1))
    with pytest.raises(InvalidInputError, match="vector_texts") as err:
        store.add("ann", ["short", LONG], unit(rng, 2))
    assert err.value.field == "vectors"
    assert [i.text for i in store.items("ann")] == ["kept"] and store.vector_count() == 1


def test_deleting_or_forgetting_a_long_item_erases_every_vector(store: HistoryStore):
    rng = np.random.default_rng(4)
    item_id, vecs = add_long(store, "ann", rng)
    same, _ = add_long(store, "ann", rng)  # stored once: the same id, no more vectors
    assert same == item_id and store.vector_count("ann") == len(vecs)
    store.delete("ann", [item_id])
    assert store.count("ann") == 0 and store.vector_count("ann") == 0
    assert store._conn.execute("SELECT COUNT(*) FROM item_parts").fetchone()[0] == 0
    add_long(store, "ann", rng)
    add_long(store, "bob", rng)
    store.forget("ann")
    assert store.vector_count() == vector_count(LONG) == store.vector_count("bob")
    assert store.integrity()["parts_without_vector"] == 0


def test_a_database_from_before_parts_gains_them_on_open(tmp_path: Path, monkeypatch):
    rng = np.random.default_rng(5)
    path = tmp_path / "old.db"
    with monkeypatch.context() as m:  # the migrations as they were before parts
        m.setattr(db, "MIGRATIONS", [s for s in db.MIGRATIONS if s[0] != "m005_parts"])
        with HistoryStore(path, DIM) as old:
            (kept,) = old.add("ann", ["written before parts"], unit(rng, 1))
            assert not old._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'item_parts'"
            ).fetchone()
    with HistoryStore(path, DIM) as store:
        item_id, vecs = add_long(store, "ann", rng)
        assert store.search("ann", vecs[-1], 1)[0].part is not None
        assert [i.id for i in store.items("ann", newest_first=False)] == [kept, item_id]


@pytest.mark.parametrize("budget", [None, 0], ids=["in memory", "in the file"])
def test_an_item_of_thousands_of_parts_gives_way_to_the_next_items(tmp_path: Path, budget):
    rng = np.random.default_rng(6)
    text = "\n\n".join(f"{i:04d} " + "w" * 196 for i in range(4_900))  # 201-char paragraphs
    n = vector_count(text)
    with HistoryStore(tmp_path / "h.db", DIM) as store:
        if budget is not None:
            store.cache_budget = budget
        base = unit(rng, 1)[0]
        near = base + 0.01 * rng.normal(size=(n, DIM)).astype(np.float32)  # all nearest it
        (big,) = store.add("ann", [text], near)
        others = store.add("ann", ["one", "two"], unit(rng, 2))
        hits = store.search("ann", base, 3)
    assert 1_000 < n <= 2 * MOST_PARTS + 1  # the parts of a long text are bounded
    assert [h.item.id for h in hits][:1] == [big]
    assert sorted(h.item.id for h in hits[1:]) == sorted(others)


def test_long_items_filling_more_than_4096_vectors_give_way_in_memory(store: HistoryStore):
    rng = np.random.default_rng(9)
    text = "\n\n".join(f"{i:04d} " + "w" * 196 for i in range(4_900))
    base = unit(rng, 1)[0]
    bigs = []
    for copy in range(4):
        n = vector_count(text + f" {copy}")
        near = base + 0.01 * rng.normal(size=(n, DIM)).astype(np.float32)
        bigs += store.add("ann", [text + f" {copy}"], near)
    others = store.add("ann", ["one", "two"], unit(rng, 2))
    assert store.vector_count("ann") > 4096 + 2
    hits = store.search("ann", base, 6)
    assert sorted(h.item.id for h in hits) == sorted(bigs + others)


def test_a_ragged_list_of_vectors_is_a_typed_error(store: HistoryStore):
    with pytest.raises(InvalidInputError):
        store.add("ann", ["a", "b"], [[0.0] * DIM, [0.0] * (DIM - 1)])
    assert not store.has_user("ann")


def test_a_query_without_direction_finds_the_first_items_in_both_paths(store: HistoryStore):
    rng = np.random.default_rng(7)
    add_long(store, "ann", rng)
    store.add("ann", ["one", "two"], unit(rng, 2))
    first = [h.item.id for h in store.search("ann", np.zeros(DIM), 2)]
    store.cache_budget = 0
    assert [h.item.id for h in store.search("ann", np.zeros(DIM), 2)] == first == [1, 2]


def strip_parts(conn) -> None:
    """The database as a release before parts left it: long items with one vector."""
    conn.execute("DELETE FROM history_vec WHERE rowid < 0")
    conn.execute("DELETE FROM item_parts")
    conn.commit()


def test_items_from_before_parts_are_given_theirs(store: HistoryStore):
    rng = np.random.default_rng(8)
    item_id, vecs = add_long(store, "ann", rng)
    store.add("ann", ["short"], unit(rng, 1))
    (bob_item, _) = add_long(store, "bob", rng)
    strip_parts(store._conn)
    store.clear_cache()
    assert store.items_without_parts("ann") == [item_id]
    assert store.search("ann", vecs[-1], 1)[0].part is None  # only its whole text's vector
    with pytest.raises(ItemNotFoundError):
        store.add_parts("ann", bob_item, vecs[1:])  # not ann's
    with pytest.raises(ItemNotFoundError):
        store.add_parts("ann", 2**64, vecs[1:])  # cannot be anyone's
    assert store.item_text("ann", 2**64) is None and store.item_text("ann", bob_item) is None
    with pytest.raises(InvalidInputError):
        store.add_parts("ann", item_id, vecs[1:3])  # too few
    assert store.add_parts("ann", item_id, vecs[1:]) == len(vecs) - 1
    assert store.add_parts("ann", item_id, vecs[1:]) == 0  # has them now
    assert store.items_without_parts("ann") == []
    hit = store.search("ann", vecs[-1], 1)[0]
    assert hit.item.id == item_id and hit.part is not None and hit.part.number == len(vecs) - 1
