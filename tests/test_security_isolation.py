"""Guarantee 2, user isolation: a user's persona (soft tokens), retrieval results and prompts
are built only from that user's own, current items.

Property (hypothesis, ≥ 1,000 cases in the slow run): random users (odd names included),
random items, deletions, forgets and copies of one user's text to another, then random
requests with every strategy. For each request the prepared prompt, its history items and
its soft tokens must be *identical* to those prepared from a store that holds nothing but
that user's current items (a metamorphic check that needs no knowledge of the internals),
and every item tag in the prompt must belong to the user. Retrieval queried with another
user's exact vectors, `items`, `vectors` and `count` must return exactly the user's items.

Speed: item vectors come from a pool embedded once by the real embedder, and the real
embedder's query vectors are memoized; prompts are built by the real PersonalLLM.prepare
(real chat template and tokenizer, real Persona-Plug head). The last test runs the whole
path without either shortcut, generation included.
"""

from __future__ import annotations

import datetime
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edge_pllm import LLMConfig, PersonalLLM, SamplingConfig  # noqa: E402
from edge_pllm.errors import InvalidInputError, UnknownUserError  # noqa: E402
from edge_pllm.storage.items import NewItem, invisible, validate_user  # noqa: E402
from edge_pllm.storage.store import HistoryStore  # noqa: E402

from .security_support import CachedEmbedder  # noqa: E402

POOL = [
    "fix(parser): handle blank lines at the end of the file",
    "docs: explain how the cache directory is chosen",
    "feat(cli): add a --json flag to the status command",
    "My grandmother's apple pie needs a pinch of cinnamon.",
    "Feed the sourdough starter twice a day.",
    "Dentist appointment moved to Thursday at 3 pm.",
    "Quarterly tax return is due next week.",
    "Run 5 km on Saturday morning before breakfast.",
    "SELECT * FROM users; DROP TABLE history; --",
    "Ich mag grünen Tee und lange Spaziergänge.",
    "日本語のメモ：明日は雨",
    "refactor(store): write rows and vectors in one transaction",
]
QUERIES = [
    "How do I fix the parser?",
    "a recipe with apples",
    "when is my appointment",
    "Write a commit subject: cache bug",
    *POOL[:4],  # another user's exact text: its vector is the nearest possible
]
TAG = re.compile(r"⟦t(\d+)⟧")
TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00⟦⟧"),
    max_size=30,
)
NAME = st.text(  # names a person can see (docs/SECURITY.md §11): any script's letters, ...
    alphabet=st.characters(
        whitelist_categories=("L", "N", "P", "S"), blacklist_characters="⟦⟧/"
    ).filter(lambda c: not invisible(c)),
    min_size=1,
    max_size=10,
)
DATE = st.one_of(
    st.none(),
    st.dates(min_value=datetime.date(2001, 1, 1)).map(lambda d: d.isoformat()),
)
ITEM = st.tuples(TEXT, st.integers(0, len(POOL) - 1), DATE)
SLOT = st.integers(0, 3)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), SLOT, st.lists(ITEM, min_size=1, max_size=6)),
        st.tuples(st.just("delete"), SLOT, st.lists(st.integers(0, 50), min_size=1, max_size=3)),
        st.tuples(st.just("forget"), SLOT),
        st.tuples(st.just("copy"), SLOT, SLOT, st.integers(0, 50)),
        st.tuples(st.just("readd"), SLOT, st.integers(0, 50)),
    ),
    min_size=1,
    max_size=10,
)
SPECS = ["none", "recent", "recent:1", "recent:6", "rag", "rag:1", "rag:8"]
PLUG_SPECS = ["plug", "plug+rag", "plug+rag:1"]
RUNS = itertools.count(1)
TAGS = itertools.count(1)


@dataclass
class Item:
    id: int
    text: str
    created_at: str | None
    vec: np.ndarray


@dataclass
class Model:
    """What the store must contain, per user (by normalized name)."""

    users: dict[str, list[Item]] = field(default_factory=dict)  # present users -> items


@pytest.fixture(scope="module")
def world(default_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("isolation-home")
    pllm = PersonalLLM(default_bundle, home=home, llm_config=LLMConfig(n_ctx=1024, n_threads=1))
    pool = pllm.embedder.embed(POOL)
    real = pllm.embedder
    pllm.embedder = CachedEmbedder(real)
    yield pllm, pool
    pllm.embedder = real
    pllm.close()


def near(vec: np.ndarray, seed: int) -> np.ndarray:
    """A unit vector close to `vec`, distinct for each item: exactly equal distances would
    leave the order of retrieval ties to storage slots, which differ between two stores."""
    v = vec + 0.02 * np.random.default_rng(seed).normal(size=vec.shape).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float32)


def prepare_with(pllm: PersonalLLM, store: HistoryStore, user: str, query: str, spec: str):
    """pllm.prepare against `store`; the outcome (prompt, context, soft tokens) or the error."""
    saved = pllm.store
    pllm.store = store
    try:
        p = pllm.prepare(user, query, spec, SamplingConfig(max_tokens=16))
    except UnknownUserError as exc:
        return ("UnknownUserError", exc.user)
    finally:
        pllm.store = saved
    soft = p.personalization.soft_tokens
    return (
        p.prompt,
        [(i.text, i.created_at) for i in p.personalization.context],
        p.dropped_context,
        None if soft is None else np.asarray(soft, dtype=np.float32),
    )


def same(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if x is None or y is None or x.shape != y.shape or not np.allclose(x, y, atol=1e-5):
                return False
        elif x != y:
            return False
    return True


def run_property(world, examples: int) -> dict[str, int]:
    pllm, pool = world
    store = pllm.store
    specs = SPECS + (PLUG_SPECS if pllm.plug is not None else [])
    counts = {"cases": 0, "requests": 0, "searches": 0}
    tags = TAGS
    cases = itertools.count(1)
    run = next(RUNS)  # the store is shared by the runs of this module: keep them apart

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        names=st.lists(NAME, min_size=1, max_size=4),
        ops=OPS,
        requests=st.lists(
            st.tuples(SLOT, st.sampled_from(specs), st.integers(0, len(QUERIES) - 1)),
            min_size=1,
            max_size=3,
        ),
    )
    def prop(names, ops, requests):
        case = next(cases)
        users: list[str] = []
        for name in names:  # a per-case prefix keeps cases apart in the one shared store
            try:
                user = validate_user(f"r{run}c{case}·{name}")
            except InvalidInputError:
                continue
            if user not in users:
                users.append(user)
        if not users:
            return
        counts["cases"] += 1
        model = Model()

        def add(user: str, entries: list[tuple[str, str | None, np.ndarray]]) -> None:
            items = [NewItem(text=t, created_at=d) for t, d, _ in entries]
            ids = store.add(user, items, np.stack([v for _, _, v in entries]))
            mine = model.users.setdefault(user, [])
            known = {i.id for i in mine}
            for item_id, (text, date, vec) in zip(ids, entries, strict=True):
                if item_id not in known:  # an exact duplicate returns the existing id
                    mine.append(Item(item_id, text, date, vec))
                    known.add(item_id)

        for op in ops:
            user = users[op[1] % len(users)]
            mine = model.users.get(user, [])
            if op[0] == "add":
                entries = []
                for t, p, d in op[2]:
                    tag = next(tags)
                    entries.append((f"{t} ⟦t{tag}⟧", d, near(pool[p], tag)))
                add(user, entries)
            elif op[0] == "delete" and mine:
                victims = list(dict.fromkeys(mine[i % len(mine)].id for i in op[2]))
                assert store.delete(user, victims) == len(victims)
                model.users[user] = [i for i in mine if i.id not in victims]
            elif op[0] == "forget" and user in model.users:
                assert store.forget(user) == len(mine)
                del model.users[user]
            elif op[0] == "copy":  # the same text, now also another user's
                source = model.users.get(users[op[2] % len(users)], [])
                if source:
                    item = source[op[3] % len(source)]
                    add(user, [(item.text, item.created_at, item.vec)])
            elif op[0] == "readd" and mine:  # adding an item again stores nothing new
                item = mine[op[2] % len(mine)]
                add(user, [(item.text, item.created_at, item.vec)])
        owners: dict[int, set[str]] = {}
        for user, items in model.users.items():
            for item in items:
                for tag in TAG.findall(item.text):  # tags are unique across runs too
                    owners.setdefault(int(tag), set()).add(user)

        # Reads: exactly the user's own current items, whatever the query vector.
        others = [i.vec for u, its in model.users.items() for i in its]
        for user in users:
            mine = model.users.get(user)
            if mine is None:
                assert not store.has_user(user)
                continue
            listed = store.items(user, newest_first=False)
            assert {(i.id, i.text) for i in listed} == {(i.id, i.text) for i in mine}
            assert all(i.user == user for i in listed)
            assert store.count(user) == len(mine) == store.vector_count(user)
            ids, matrix = store.vectors(user, limit=None)
            assert sorted(ids) == sorted(i.id for i in mine)
            by_id = {i.id: i.vec for i in mine}
            assert all(np.array_equal(matrix[n], by_id[i]) for n, i in enumerate(ids))
            for vec in [*others[:3], pool[0]]:
                hits = store.search(user, vec, k=50)
                assert sorted(h.item.id for h in hits) == sorted(by_id)
                counts["searches"] += 1

        # Requests: identical to a store that holds only this user's current items.
        for slot, spec, q in requests:
            user = users[slot % len(users)]
            query = QUERIES[q]
            got = prepare_with(pllm, store, user, query, spec)
            with HistoryStore(":memory:", store.dim) as alone:
                mine = model.users.get(user)
                if mine is not None:
                    stored = {i.id: i for i in store.items(user)}
                    if mine:
                        entries = sorted(mine, key=lambda i: i.id)
                        alone.add(
                            user,
                            [NewItem(i.text, created_at=stored[i.id].created_at) for i in entries],
                            np.stack([i.vec for i in entries]),
                        )
                    else:  # the user exists with no items left
                        alone.delete(user, alone.add(user, ["x"], pool[:1]))
                expected = prepare_with(pllm, alone, user, query, spec)
            assert same(got, expected), (user, spec, query)
            if isinstance(got[0], str) and got[0] != "UnknownUserError":
                for tag in TAG.findall(got[0]):
                    assert user in owners.get(int(tag), set()), f"tag {tag} is not {user}'s"
            counts["requests"] += 1

    prop()
    return counts


def check_isolation(world, report_counts, examples: int, at_least: int) -> None:
    counts = run_property(world, examples=examples)
    assert counts["cases"] >= at_least
    report_counts(
        f"{counts['cases']} hypothesis cases, {counts['requests']} requests, "
        f"{counts['searches']} cross-user searches: every one isolated"
    )


def test_isolation_property_fast(world, report_counts):
    check_isolation(world, report_counts, examples=200, at_least=150)


@pytest.mark.slow
def test_isolation_property_thousand_cases(world, report_counts):
    check_isolation(world, report_counts, examples=1100, at_least=1000)


def test_isolation_through_the_whole_runtime(default_bundle: Path, tmp_path: Path):
    """No shortcuts: real embedding at ingest and query, real generation. What alice gets
    in a store shared with bob and carol equals what she gets alone."""
    config = LLMConfig(n_ctx=1024, n_threads=1)
    shared = PersonalLLM(default_bundle, home=tmp_path / "shared", llm_config=config)
    alone = PersonalLLM(default_bundle, home=tmp_path / "alone", llm_config=config)
    alice = [
        {"text": "fix(parser): handle blank lines", "created_at": "2024-01-01"},
        {"text": "docs: explain the cache", "created_at": "2024-01-02"},
        {"text": "feat: add a json flag", "created_at": "2024-01-03"},
    ]
    with shared, alone:
        shared.add("bob", ["fix(parser): handle blank lines BOB", "apple pie recipe"])
        a_ids = shared.add(
            "alice", [*alice, {"text": "secret ALICE-DELETED", "created_at": "2024-01-04"}]
        )
        shared.add("carol", ["docs: explain the cache CAROL", "tax return"])
        shared.store.delete("alice", [a_ids[-1]])
        shared.store.forget("carol")
        alone.add("alice", alice)
        own = set(a_ids[:-1])
        specs = ["none", "recent:3", "rag:3"] + (["plug", "plug+rag:2"] if shared.plug else [])
        sampling = SamplingConfig(max_tokens=3)
        for spec in specs:
            for query in ("fix the parser", "apple pie", "explain the cache"):
                a = shared.prepare("alice", query, spec, sampling)
                b = alone.prepare("alice", query, spec, sampling)
                assert a.prompt == b.prompt
                assert "BOB" not in a.prompt and "CAROL" not in a.prompt
                assert "ALICE-DELETED" not in a.prompt
                assert {i.id for i in a.personalization.context} <= own
                sa, sb = a.personalization.soft_tokens, b.personalization.soft_tokens
                assert (sa is None) == (sb is None)
                if sa is not None:
                    np.testing.assert_allclose(sa, sb, atol=1e-5)
        for spec in specs[2::2]:  # generation too, for rag and (with a head) plug+rag
            response = shared.generate("alice", "fix the parser", strategy=spec, sampling=sampling)
            assert set(response.context_ids) <= own
            assert (
                response.text
                == alone.generate("alice", "fix the parser", strategy=spec, sampling=sampling).text
            )
