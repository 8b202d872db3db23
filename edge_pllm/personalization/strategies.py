"""Personalization strategies behind one seam.

A strategy looks at the user's stored history and returns a `Personalization`: history
items to show in the prompt and/or soft-token embeddings to put in front of it. How those
are turned into a prompt is `prompts.py`'s job, so strategies differ only in what they add.

Strategies are named by a spec string: `none`, `recent`, `recent:5`, `rag`, `rag:3`, `plug`,
`plug+rag`, `plug+rag:3`; any of them (consensus too) with `+opening`, as `plug+rag:1+opening`,
opens the answer the way the user opens theirs (`Opening`). A strategy that reads the
bundle's Persona-Plug head says so with `needs_head`, and the caller then puts the head
(`head.PlugHead`) in the `Request`.
`consensus[:N]` and `consensus-beam[:N]` name a way to answer rather than a prompt: a decoder
(decoding/decoders.py), which draws the answer from the prompts its member strategies prepare.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..errors import BundleError, InvalidInputError, UnknownStrategyError
from ..storage.items import TURN_KIND, HistoryItem
from ..storage.store import HistoryStore, SearchHit
from .head import PlugHead

DEFAULT_K = 3
MAX_K = 100  # items in a prompt: more never fits a context


class QueryVector:
    """The request's embedding, computed by the first step that asks for it and then shared
    by every other step of the same request (each member of a consensus, `+opening` after
    retrieval, the turn stored with memory on): one request, one embedding."""

    def __init__(self, embed_one: Callable[[str], np.ndarray]):
        self._embed_one = embed_one  # called only when a step asks: `none` never embeds
        self._text: str | None = None
        self._value: np.ndarray | None = None

    def of(self, text: str) -> np.ndarray:
        if self._value is None or text != self._text:
            self._text, self._value = text, self._embed_one(text)
        return self._value.copy()

    def computed(self, text: str) -> np.ndarray | None:
        """The embedding of `text` if a step has computed it, else None."""
        return self._value if text == self._text else None


@dataclass(frozen=True)
class Request:
    """What a strategy gets to work with: one user, one query, that user's store, and the
    query's embedding (`query_vector`)."""

    user: str
    query: str
    store: HistoryStore
    vectors: QueryVector
    plug: PlugHead | None = None

    def query_vector(self) -> np.ndarray:
        return self.vectors.of(self.query)


@dataclass
class Personalization:
    """What a strategy adds: history items for the prompt, soft tokens, the answer's
    opening, and notes for logs."""

    context: list[HistoryItem] = field(default_factory=list)
    soft_tokens: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # The "area: " the answer opens with (the user's own habit): it replaces the opening
    # the model wrote, or goes in front of an answer without one (`opened`).
    answer_start: str = ""


class Strategy(Protocol):
    """Turns a `Request` into a `Personalization`. `needs_head`: it reads `Request.plug`,
    the bundle's Persona-Plug head (the caller loads the head only for such strategies)."""

    name: str
    needs_head: bool

    def personalize(self, request: Request) -> Personalization: ...


NO_HISTORY = "no history: plain prompt"
POPULATION = "no history: population persona"
NOT_RELEVANT = "no relevant history item: plain prompt"
NOT_RELEVANT_PLUG = "no relevant history item: persona only"
# Retrieved items less similar to the request than this (cosine) are not shown: an
# unrelated item is copied, not learned from. Chosen on the validation repositories of the
# corpus split by person (55 dev queries, `rag:1` ROUGE-1: 0.150 showing every nearest
# item, 0.160 at 0.4, 0.159 at 0.5, `none` 0.147; docs/CORPUS.md).
MIN_SIMILARITY = 0.4
POPULATION_PRIOR = 2.0  # how many history items the population persona weighs as


def relevant(hits: list[SearchHit], min_similarity: float) -> list[SearchHit]:
    """The hits whose cosine similarity to the request is at least `min_similarity`."""
    return [h for h in hits if 1.0 - h.distance >= min_similarity]


# How many more items than asked a search reads, so that remembered turns can give way.
TURN_DEPTH = 4


def nearest(request: Request, k: int, min_similarity: float) -> list[SearchHit]:
    """The `k` relevant items nearest to the request, what the person wrote or kept before
    their own remembered questions (kind "turn"): an earlier question resembles the new
    one more than the note that answers it does, and would crowd it out. Turns fill the
    places left. When turns fill all `TURN_DEPTH` × k read, the person's own nearest are
    searched for past them (`HistoryStore.search`'s `skip_kind`: in memory past any number
    of turns; from the file among the nearest MAX_K), the texts read only for those kept."""
    query_vec = request.query_vector()
    depth = k * TURN_DEPTH
    found = request.store.search(request.user, query_vec, depth)
    hits = relevant(found, min_similarity)  # nearest first: a prefix of what was found
    turns = [h for h in hits if h.item.kind == TURN_KIND]
    if len(hits) - len(turns) < k and len(hits) == len(found) == depth:
        own = request.store.search(request.user, query_vec, k, skip_kind=TURN_KIND)
        return (relevant(own, min_similarity) + turns)[:k]
    return sorted(hits, key=lambda h: h.item.kind == TURN_KIND)[:k]  # stable: by distance


def no_history(request: Request) -> Personalization | None:
    """The plain prompt, said so in `info["fallback"]`, for a user the store has never
    seen: a first conversation is not an error."""
    if request.store.has_user(request.user):
        return None
    return Personalization(info={"fallback": NO_HISTORY})


@dataclass(frozen=True)
class NoPersonalization:
    """The plain prompt: the baseline every other strategy is measured against."""

    name: str = "none"
    needs_head: bool = field(default=False, init=False)

    def personalize(self, request: Request) -> Personalization:
        return Personalization()


@dataclass(frozen=True)
class Recent:
    """The user's k most recent history items, newest first, in the prompt."""

    k: int = DEFAULT_K
    name: str = "recent"
    needs_head: bool = field(default=False, init=False)

    def personalize(self, request: Request) -> Personalization:
        if (fallback := no_history(request)) is not None:
            return fallback
        items = request.store.items(request.user, limit=self.k)
        return Personalization(context=items, info={"item_ids": [i.id for i in items]})


@dataclass(frozen=True)
class Retrieval:
    """The k history items most similar to the query (cosine, within the user), in the
    prompt (of a long item, the part found: `SearchHit.passage`); those under
    `min_similarity` are left out, and with none left the prompt is the plain one
    (`info["fallback"]` says so)."""

    k: int = DEFAULT_K
    name: str = "rag"
    min_similarity: float = MIN_SIMILARITY
    needs_head: bool = field(default=False, init=False)

    def personalize(self, request: Request) -> Personalization:
        if (fallback := no_history(request)) is not None:
            return fallback
        hits = nearest(request, self.k, self.min_similarity)
        info: dict[str, Any] = {"item_ids": [h.item.id for h in hits]}
        info["distances"] = [h.distance for h in hits]
        if not hits:
            info["fallback"] = NOT_RELEVANT
        return Personalization(context=[h.passage for h in hits], info=info)


@dataclass(frozen=True)
class Plug:
    """PPlug: the user's whole history as soft tokens made by the bundle's head; with `rag`
    > 0, also the k nearest history items in the prompt (plug+rag), those whose similarity
    is under `min_similarity` left out (`info["fallback"]` says when none is left).

    With `population` (and a head that ships its population history), a user with little
    history is shrunk towards the population persona: soft tokens
    α·own + (1 − α)·population with α = n / (n + POPULATION_PRIOR) for n history items, so
    a user with none gets the population persona and the own persona takes over as the
    history grows. Without it (or without a population file), a user with no history, or
    unknown to the store, gets no soft tokens: `plug` then answers with the plain prompt
    (and `plug+rag` with neither retrieved items nor soft tokens). `info["fallback"]` says
    which happened."""

    rag: int = 0
    name: str = "plug"
    population: bool = True
    min_similarity: float = MIN_SIMILARITY
    needs_head: bool = field(default=True, init=False)

    def personalize(self, request: Request) -> Personalization:
        head = request.plug
        if head is None:
            raise BundleError("This bundle has no Persona-Plug head; use none, recent or rag.")
        prior = head.population if self.population else None
        known = no_history(request) is None
        ids, history = (
            request.store.vectors(request.user, limit=head.max_history) if known else ([], None)
        )
        if not ids and prior is None:
            return Personalization(info={"fallback": NO_HISTORY})
        # The request's embedding is needed by a linear head and by retrieval only.
        query: str | np.ndarray = request.query
        if (self.rag and ids) or not head.reads_text:
            query_vec = request.query_vector()
            query = request.query if head.reads_text else query_vec
        if not ids:
            soft = head.soft_tokens(query, prior)
            return Personalization(soft_tokens=soft, info={"fallback": POPULATION})
        soft = head.soft_tokens(query, history)
        found = Personalization(info={"history_items": len(ids)})
        if prior is not None:
            weight = POPULATION_PRIOR / (len(ids) + POPULATION_PRIOR)
            soft = (1 - weight) * soft + weight * head.soft_tokens(query, prior)
            found.info["population_weight"] = round(weight, 4)
        found.soft_tokens = soft.astype(np.float32)
        if self.rag:
            hits = nearest(request, self.rag, self.min_similarity)
            found.context = [h.passage for h in hits]
            found.info["item_ids"] = [h.item.id for h in hits]
            if not hits:
                found.info["fallback"] = NOT_RELEVANT_PLUG
        return found


# "area: " at the start of a line, as in "net: fix the timeout" (no space before the colon).
_OPENING = re.compile(r"\A([^\s:]{1,40}): ")
OPENING = "+opening"  # the suffix that gives any strategy the user's opening
OPENING_ITEMS = 300  # the newest items whose openings count for the user's habit


def opening(text: str) -> str | None:
    """The "area: " a text's first line opens with (e.g. "net: " for "net: fix it"), or None."""
    found = _OPENING.search(text.lstrip().partition("\n")[0])  # \A-anchored: a start
    return found.group(0) if found else None


def opened(start: str, answer: str) -> str:
    """`answer` opening with `start`: the opening the model wrote replaced by it, or `start`
    put in front. (Given to the model as the answer's first words instead, the opening
    made it write worse: docs/EVAL.md.)"""
    answer = answer.lstrip()
    own = opening(answer)
    return start + (answer[len(own) :] if own else answer).lstrip()


@dataclass(frozen=True)
class Opening:
    """Another strategy's prompt, and an answer that starts the way this user starts theirs.

    A user who opens at least `min_share` of their history items with an "area: " (their
    newest `OPENING_ITEMS`) gets the opening most of the `k` items nearest to the request
    share: the answer the model writes (with `inner`'s prompt) opens with it instead of its
    own opening, if it had one (`opened`). Anyone else gets `inner`'s answer unchanged.
    `info["opening"]` says which opening."""

    inner: Strategy
    k: int = 3
    min_share: float = 0.7

    @property
    def name(self) -> str:
        return self.inner.name + OPENING

    @property
    def needs_head(self) -> bool:
        return self.inner.needs_head

    def personalize(self, request: Request) -> Personalization:
        found = self.inner.personalize(request)
        if no_history(request) is not None:
            return found
        items = request.store.items(request.user, limit=OPENING_ITEMS)
        if not items or sum(opening(i.text) is not None for i in items) < self.min_share * len(
            items
        ):
            return found
        query_vec = request.query_vector()
        near = [opening(h.item.text) for h in request.store.search(request.user, query_vec, self.k)]
        counts = Counter(o for o in near if o is not None)
        if counts:
            # Ties go to the nearer item's opening (Counter keeps first-seen order).
            found.answer_start = counts.most_common(1)[0][0]
            found.info["opening"] = found.answer_start
        return found


StrategyFactory = Callable[[int | None], Strategy]

REGISTRY: dict[str, StrategyFactory] = {
    "none": lambda k: NoPersonalization(),
    "recent": lambda k: Recent(k=k or DEFAULT_K),
    "rag": lambda k: Retrieval(k=k or DEFAULT_K),
    "plug": lambda k: Plug(),
    "plug+rag": lambda k: Plug(rag=k or DEFAULT_K, name="plug+rag"),
    # The persona from the user's own history alone (no population prior): the ablation.
    "plug-own": lambda k: Plug(name="plug-own", population=False),
}


def register(name: str, factory: StrategyFactory) -> None:
    """Make a strategy available by name (e.g. `plug`)."""
    REGISTRY[name] = factory


def spec_k(spec: str, k_text: str) -> int | None:
    """The N of a spec `name:N` (None without one), checked: InvalidInputError."""
    if not k_text:
        return None
    if not (k_text.isascii() and k_text.isdigit() and len(k_text) <= 6):
        raise InvalidInputError(f"In strategy {spec!r}, k must be an integer.", field="strategy")
    return int(k_text)


def get_strategy(spec: str | Strategy, k: int | None = None) -> Strategy:
    """Resolve `spec` ("rag", "rag:5", "rag:5+opening", or a Strategy object) to the prompt
    strategy it names (a decoder such as `consensus` is resolved by `decoders.resolve`)."""
    if not isinstance(spec, str):
        return spec
    spec = spec.strip()
    if spec.endswith(OPENING):
        return Opening(get_strategy(spec.removesuffix(OPENING), k))
    name, _, k_text = spec.partition(":")
    if name not in REGISTRY:
        raise UnknownStrategyError(name, sorted(REGISTRY))
    k = spec_k(spec, k_text) if k_text else k
    if k is not None and not 1 <= k <= MAX_K:
        raise InvalidInputError(f"k must be 1..{MAX_K} (got {k}).", field="k")
    return REGISTRY[name](k)
