"""`PersonalLLM`: the one class most callers need.

from edge_pllm import PersonalLLM
pllm = PersonalLLM()                       # default bundle, default home
pllm.add("alice", ["...", "..."])          # history, embedded once at insert
print(pllm.generate("alice", "...").text)  # personalized by retrieval (rag)

Memory is opt-in, per call: `generate(..., remember=True)` (or `stream`) stores the user's
own request, once the answer is complete, as a history item of kind "turn", and keeps the
answer (its id, `Response.id`, is the one a client sees) so the user can rate it or say what
they kept instead: `feedback(user, answer_id, rating=+1)` or `feedback(..., edit="...")`.
An edit is the user's own writing: it becomes a history item of kind "edit". Without
memory nothing of a request or its answer is stored.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import paths
from .decoding.decoders import Drawer, Drawn, Plan, Prepared, resolve
from .defaults import ensure_default_bundle
from .errors import AnswerNotFoundError, BundleError, InvalidInputError, ItemNotFoundError
from .inference.bundle import Bundle, Placement, load_bundle
from .inference.embedder import Embedder
from .inference.llm import LLM, Completion, LLMConfig, SamplingConfig
from .inference.model_registry import get_model, model_bundle
from .inference.onnx_session import return_freed_memory
from .personalization.head import PlugHead
from .personalization.prompts import DEFAULT_STYLE, PromptStyle, fit_prompt
from .personalization.strategies import (
    Personalization,
    QueryVector,
    Request,
    Strategy,
    opening,
)
from .storage.items import (
    MAX_ITEM_CHARS,
    TURN_KIND,
    NewItem,
    as_text,
    validate_answer_id,
    validate_items,
    validate_user,
)
from .storage.parts import texts_to_embed, vector_texts
from .storage.store import (
    AnswerRecord,
    Feedback,
    HistoryStore,
    SearchHit,
    check_cache_budget,
    check_rating,
)

if TYPE_CHECKING:
    from .sources.importing import ImportReport

DEFAULT_STRATEGY = "rag"
EDIT_KIND = "edit"  # the text the user kept instead of an answer
LINKED_REQUEST_CHARS = 2_000  # how much of its request an edit's metadata carries
PROFILE_ITEMS = 512  # history items per exported training question (the head reads 512)


def new_answer_id() -> str:
    return "ans-" + uuid.uuid4().hex[:24]


@dataclass
class Memory:
    """What remembering a turn did: the turn's history item id, or why it was not stored
    (the answer itself is never failed for it)."""

    remembered: bool
    item_id: int | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.remembered:
            return {"remembered": True, "item_id": self.item_id}
        return {"remembered": False, "reason": self.reason}


@dataclass
class Response:
    """A personalized generation: the text, and what personalized it."""

    text: str
    user: str
    strategy: str
    context_ids: list[int] = field(default_factory=list)
    dropped_context: int = 0
    soft_tokens: int = 0
    completion: Completion | None = None
    id: str = ""  # the answer's id: what `feedback` names it by
    memory: Memory | None = None  # with remember=True: what was stored


@dataclass
class _Personalized:
    """A request personalized by one prompt strategy, before the LLM renders it."""

    messages: list[dict[str, str]]
    query: str
    strategy: str
    found: Personalization
    placement: Placement
    vector: np.ndarray | None


class _EmbedderSlot:
    """A bundle's embedder, opened by the first caller that needs it."""

    def __init__(self, bundle: Bundle):
        self._bundle = bundle
        self._lock = threading.Lock()
        self._embedder: Embedder | None = None

    def get(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                spec = self._bundle.embedder
                self._embedder = Embedder(
                    self._bundle.file(spec.file), self._bundle.file(spec.tokenizer), spec.config
                )
            return self._embedder

    def set(self, embedder: Embedder | None) -> None:
        with self._lock:
            self._embedder = embedder


class PersonalLLM:
    """A frozen local LLM personalized by each user's on-device history."""

    def __init__(
        self,
        bundle: str | Path | None = None,
        *,
        home: str | Path | None = None,
        llm_config: LLMConfig | None = None,
        system_prompt: str | None = None,
        passphrase: str | None = None,
        remember_max_chars: int = MAX_ITEM_CHARS,
        cache_budget: int | None = None,
        model: str | None = None,
        one_shot: bool = False,
    ):
        """`passphrase` opens (or creates) the history database encrypted at rest
        (SQLCipher; needs `pip install 'edge-pllm[encryption]'`). A remembered turn longer
        than `remember_max_chars` is not stored (the answer says so in `Response.memory`).
        `cache_budget`: the bytes of history vectors kept in memory for search (default a
        quarter of the memory the process may use, its container's limit included, at
        least 256 MiB; 0 searches the database file every time, see `HistoryStore`).
        `model`: a GGUF registered with `edge-pllm models add` answers in place of the
        bundle's LLM (see `models`). `one_shot`: a process that answers one request and
        ends (`edge-pllm ask`): the embedder and the Persona-Plug head are let go as soon
        as the prompt is personalized, before the LLM loads, so that their memory is not
        held beside the LLM's (except for a head with a task adapter, which needs the LLM
        first, and the embedder when a turn to remember must still be embedded)."""
        if cache_budget is not None:  # before a bundle is built or a file opened
            check_cache_budget(cache_budget)
        self.remember_max_chars = remember_max_chars
        self.one_shot = one_shot
        self.home = paths.home(home)
        bundle_path = Path(bundle) if bundle is not None else ensure_default_bundle(self.home)
        self._base: Bundle = load_bundle(bundle_path)
        self.bundle: Bundle = self._base
        self.model = model  # the registered model it answers with (None: the bundle's LLM)
        if model is not None:
            self.bundle = model_bundle(self.home, get_model(self.home, model), self._base)
        self._embedder = _EmbedderSlot(self.bundle)  # shared with `with_model`'s twins
        if not paths.database_path(self.home).exists():
            # A new database takes the manifest's width: the embedder's own is checked
            # before it is made. An existing one was made with a checked width.
            self.embedder  # noqa: B018
        self.store = HistoryStore(
            paths.database_path(self.home),
            self.bundle.embedder.config.dim,
            passphrase=passphrase,
            cache_budget=cache_budget,
        )
        self.llm_config = llm_config or LLMConfig()
        self.system_prompt = system_prompt
        self._llm: LLM | None = None
        self._plug: PlugHead | None = None
        self._llm_lock = threading.RLock()
        self._owns_store = True
        self._family: list[PersonalLLM] = [self]  # the runtimes over this store

    def with_model(self, model: str | None, registry: str | Path | None = None) -> PersonalLLM:
        """This runtime answering with the registered `model` (None: the bundle's own LLM),
        over the same store and embedder: its own LLM, loaded on first use. Closing it
        leaves the store open (this one owns it). `registry`: the data directory `model`
        was registered in (default this runtime's home; an evaluation's runtime keeps its
        store in its run folder and takes the person's models)."""
        twin = copy.copy(self)
        home = self.home if registry is None else Path(registry)
        twin.bundle = self._base
        if model is not None:
            twin.bundle = model_bundle(home, get_model(home, model), self._base)
        twin._llm, twin._plug, twin._llm_lock = None, None, threading.RLock()
        twin._owns_store, twin.model = False, model
        self._family.append(twin)  # the same list: a shallow copy shares it
        return twin

    @property
    def embedder(self) -> Embedder:
        """The bundle's sentence embedder, opened on first use: a request that embeds
        nothing (`none`, `recent`) never loads it, nor onnxruntime."""
        return self._embedder.get()

    @embedder.setter
    def embedder(self, embedder: Embedder) -> None:
        self._embedder.set(embedder)

    def unload_encoders(self, embedder: bool = True) -> None:
        """Let this runtime's Persona-Plug head and (with `embedder`) the embedder go: each
        opens again when next used. onnxruntime's sessions hold about 70 MiB."""
        self._plug = None
        if embedder:
            self._embedder.set(None)
        return_freed_memory()

    def _embed_one(self, text: str) -> np.ndarray:
        return self.embedder.embed_one(text)

    @property
    def base_bundle(self) -> Bundle:
        """The bundle as loaded, before a registered model took its LLM's place."""
        return self._base

    @property
    def loaded(self) -> bool:
        """Whether the LLM is in memory now."""
        return self._llm is not None

    def unload(self) -> None:
        """Let the LLM go (waiting for a generation in progress); it loads again when next
        used."""
        with self._llm_lock:
            self._llm = None

    @property
    def llm(self) -> LLM:
        """The language model, loaded on first use (adding history does not need it)."""
        with self._llm_lock:
            if self._llm is None:
                spec = self.bundle.llm
                llm = LLM(self.bundle.file(spec.file), self.llm_config, spec.chat_template)
                head = self.bundle.plug
                if head is not None and head.adapter_file is not None:
                    try:
                        llm.load_adapter(self.bundle.file(head.adapter_file))
                    except BundleError as exc:  # the plain model answers on; the head,
                        # trained with its adapter, is refused with the reason
                        self.bundle = replace(self.bundle, plug=None, plug_error=exc)
                        self._plug = None
                self._llm = llm
            return self._llm

    @contextlib.contextmanager
    def in_use(self) -> Iterator[LLM]:
        """The LLM, loaded and held by this thread until the block ends: `unload` (another
        model making room in the server) waits for it."""
        with self._llm_lock:
            yield self.llm

    def head_usable(self) -> bool:
        """Whether the bundle's Persona-Plug head can answer: False when there is none, or
        when it was refused (`Bundle.plug_error` says why). A head with a task adapter is
        known only once llama.cpp has taken the adapter, so this loads the model then."""
        head = self.bundle.plug
        if self._llm is None and head is not None and head.adapter_file is not None:
            self.llm  # noqa: B018 - loading may refuse the head
        return self.bundle.plug is not None

    @property
    def plug(self) -> PlugHead | None:
        """The bundle's Persona-Plug head, loaded on first use; None if the bundle has none.
        BundleError if it has one that does not fit it (`Bundle.plug_error` says why)."""
        has_head = self.bundle.plug is not None or self.bundle.plug_error is not None
        head = self._plug
        if head is None and has_head:
            head = self._plug = PlugHead(self.bundle)
        return head

    def close(self) -> None:
        """Close the store (a `with_model` twin: let its LLM go, the store stays open)."""
        if self._owns_store:
            self.store.close()
            return
        self.unload()
        with contextlib.suppress(ValueError):  # closed twice
            self._family.remove(self)

    def __enter__(self) -> PersonalLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- history ------------------------------------------------------------------------------

    def add(
        self,
        user: str,
        items: str | NewItem | dict[str, Any] | Sequence[str | NewItem | dict[str, Any]],
        progress: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Add history for `user`, embedding it once (a long item in parts: `parts`); all
        items land, or none do. `progress` is told how many texts were embedded."""
        if isinstance(items, str | bytes | NewItem | dict):
            items = [items]  # type: ignore[list-item]
        user = validate_user(user)
        checked = validate_items(items)
        texts = texts_to_embed(i.text for i in checked)
        return self.store.add(user, checked, self.embedder.embed(texts, progress=progress))

    def delete(self, user: str, ids: Sequence[int]) -> int:
        """Delete items of `user` (all or none), and drop the model's cached prompt, which
        may hold their text."""
        n = self.store.delete(user, ids)
        self._drop_cached_prompt()
        return n

    def forget(self, user: str) -> int:
        """Erase `user` and all their items, and drop the model's cached prompt."""
        n = self.store.forget(user)
        self._drop_cached_prompt()
        return n

    def import_paths(
        self,
        user: str,
        paths: Sequence[str | os.PathLike[str]],
        *,
        me: Collection[str] = (),
        progress: Callable[[Path], None] | None = None,
        again: bool = False,
        embedding: Callable[[Path, int], Callable[[int], None] | None] | None = None,
    ) -> ImportReport:
        """Import the files and folders `paths` (notes, documents, mail, chat exports; see
        `importing`) into `user`'s history. Importing again reads only what changed and
        removes what a folder no longer holds (`again`: every file is read, changed or
        not); `me` names the person's mail addresses. `progress` and `embedding` follow the
        work (`importing.import_paths`)."""
        from .sources.importing import import_paths  # mail and HTML parsers: only when importing

        user = validate_user(user)
        report = import_paths(
            self.store,
            lambda texts, done: self.embedder.embed(texts, progress=done),
            user,
            paths,
            me=me,
            progress=progress,
            again=again,
            embedding=embedding,
        )
        if report.removed:
            self._drop_cached_prompt()  # what changed or went stays in no cached prompt
        return report

    def reindex(self, user: str, progress: Callable[[int], None] | None = None) -> int:
        """Give `user`'s long items stored before parts existed a vector for each part, so
        that all of them is searchable; returns how many items got parts. `progress` is
        told of each item done."""
        done = 0
        for item_id in self.store.items_without_parts(user):
            text = self.store.item_text(user, item_id)
            if text is not None:  # not deleted meanwhile (by another process)
                vectors = self.embedder.embed(vector_texts(text)[1:])
                with contextlib.suppress(ItemNotFoundError):
                    done += self.store.add_parts(user, item_id, vectors) > 0
            if progress is not None:
                progress(1)
        return done

    def search(self, user: str, query: str, k: int = 5) -> list[SearchHit]:
        """`user`'s `k` history items nearest to the text `query` (cosine), nearest first.
        The query is checked as any text that is embedded (InvalidInputError)."""
        query = validate_items([query])[0].text
        return self.store.search(user, self.embedder.embed_one(query), k)

    def _drop_cached_prompt(self) -> None:
        """Empty the KV cache of this runtime and of every `with_model` one over the same
        store: erased text stays in no model's cached prompt."""
        for runtime in self._family:
            with runtime._llm_lock:
                if runtime._llm is not None:
                    runtime._llm.reset()

    # --- generation ---------------------------------------------------------------------------

    def prepare(
        self,
        user: str,
        prompt: str | Sequence[dict[str, str]],
        strategy: str | Strategy = DEFAULT_STRATEGY,
        sampling: SamplingConfig | None = None,
        style: PromptStyle = DEFAULT_STYLE,
        *,
        vectors: QueryVector | None = None,
    ) -> Prepared:
        """Personalize `prompt` (a request, or chat messages whose last user turn is the
        request) for `user`: the templated text and soft tokens to generate from. Prompts
        prepared for one request can share its embedding through `vectors`."""
        plan = resolve(strategy)
        if not plan.decoder.streams:
            raise InvalidInputError(
                f"{plan.name} chooses among whole answers: use generate or stream.",
                field="strategy",
            )
        sampling = sampling or SamplingConfig()
        vectors = vectors or QueryVector(self._embed_one)
        personalized = self._personalize(user, prompt, plan.prompts[0], vectors)
        return self._render(personalized, sampling, style)

    def _prepare_all(
        self,
        user: str,
        prompt: str | Sequence[dict[str, str]],
        prompts: Sequence[Strategy],
        sampling: SamplingConfig,
        style: PromptStyle,
        remember: bool,
    ) -> list[Prepared]:
        """`prompts` prepared, the request embedded once for all. A `one_shot` runtime lets
        the head and the embedder go once every prompt is personalized, before the LLM is
        loaded to render them (the embedder stays for a turn to remember whose request no
        prompt embedded)."""
        vectors = QueryVector(self._embed_one)
        found = [self._personalize(user, prompt, p, vectors) for p in prompts]
        for f in found:  # a later prompt may have embedded the request
            f.vector = f.vector if f.vector is not None else vectors.computed(f.query)
        if self.one_shot:  # a turn to remember is embedded after the answer, if not yet
            self.unload_encoders(embedder=not (remember and found[0].vector is None))
        return [self._render(f, sampling, style) for f in found]

    def _personalize(
        self,
        user: str,
        prompt: str | Sequence[dict[str, str]],
        chosen: Strategy,
        vectors: QueryVector,
    ) -> _Personalized:
        user = validate_user(user)
        messages = _as_messages(prompt)
        query = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        plug = None
        if chosen.needs_head:
            spec = self.bundle.plug
            if spec is not None and spec.adapter_file is not None:
                self.llm  # noqa: B018 - first: a head whose adapter llama.cpp refuses is refused
            plug = self.plug
        found = chosen.personalize(Request(user, query, self.store, vectors, plug))
        if found.answer_start and opening(found.answer_start) != found.answer_start:
            raise InvalidInputError(
                f"An answer's opening is one 'area: ' (got {found.answer_start[:40]!r}).",
                field="answer_start",
            )
        placement = plug.placement if plug is not None else "prefix"
        vector = vectors.computed(query)
        return _Personalized(messages, query, chosen.name, found, placement, vector)

    def _render(
        self, personalized: _Personalized, sampling: SamplingConfig, style: PromptStyle
    ) -> Prepared:
        """The personalized request as the LLM's templated text, within its context."""
        llm = self.llm
        found = personalized.found
        n_soft = 0 if found.soft_tokens is None else len(found.soft_tokens)
        text, kept = fit_prompt(
            personalized.messages,
            found.context,
            render=llm.apply_chat_template,
            count_tokens=llm.count_tokens,
            most_tokens=llm.most_tokens,
            budget=llm.n_ctx - sampling.max_tokens - n_soft,
            n_ctx=llm.n_ctx,
            max_tokens=sampling.max_tokens,
            soft_tokens=n_soft,
            system=self.system_prompt,
            style=style,
        )
        dropped = len(found.context) - len(kept)
        found.context = kept
        return Prepared(
            text,
            found,
            personalized.strategy,
            dropped,
            personalized.placement,
            personalized.query,
            personalized.vector,
        )

    def generate(
        self,
        user: str,
        prompt: str | Sequence[dict[str, str]],
        *,
        strategy: str | Strategy = DEFAULT_STRATEGY,
        sampling: SamplingConfig | None = None,
        style: PromptStyle = DEFAULT_STYLE,
        on_prepared: Callable[[Prepared], None] | None = None,
        remember: bool = False,
        answer_id: str | None = None,
        keep: Callable[[], bool] | None = None,
    ) -> Response:
        """Generate an answer to `prompt` personalized by `user`'s history.

        With `remember`, the user's last turn is then stored as a history item (kind
        "turn") and the answer kept for `feedback` under `Response.id` (`answer_id`, or a
        new one); `Response.memory` says what was stored. `keep`, when given, is asked once
        the answer is complete: False (its reader has gone) stores nothing."""
        done: list[Response] = []
        pieces = self.stream(
            user,
            prompt,
            strategy=strategy,
            sampling=sampling,
            style=style,
            on_prepared=on_prepared,
            remember=remember,
            answer_id=answer_id,
            on_done=done.append,
            keep=keep,
        )
        for _ in pieces:
            pass
        return done[0]

    def stream(
        self,
        user: str,
        prompt: str | Sequence[dict[str, str]],
        *,
        strategy: str | Strategy = DEFAULT_STRATEGY,
        sampling: SamplingConfig | None = None,
        style: PromptStyle = DEFAULT_STYLE,
        on_prepared: Callable[[Prepared], None] | None = None,
        remember: bool = False,
        answer_id: str | None = None,
        on_done: Callable[[Response], None] | None = None,
        keep: Callable[[], bool] | None = None,
    ) -> Iterator[str]:
        """Like `generate`, yielding text as it is produced; `on_prepared` sees what
        personalized the prompt before the first piece, `on_done` the whole `Response`
        (its id, its `completion` with the usage and finish reason, and with `remember` what
        was stored) once the stream has ended. The turn is remembered only when the stream
        ends normally: a reader that stops early (an interrupted reply) stores nothing, nor
        one that `keep` says has gone."""
        sampling = sampling or SamplingConfig()
        answer_id = self._answer_id(user, answer_id, remember)
        pieces: list[str] = []
        ended: list[Completion] = []
        plan = resolve(strategy)
        with self._llm_lock:
            if plan.decoder.streams:
                (prepared,) = self._prepare_all(
                    user, prompt, plan.prompts[:1], sampling, style, remember
                )
                stream: Iterator[str] = Drawer(self.llm).stream(
                    prepared, sampling, style, ended.append
                )
            else:  # chosen whole: one piece
                prepared, text, completion = self._complete(
                    user, prompt, plan, sampling, style, remember
                )
                ended.extend([completion] if completion is not None else [])
                stream = iter([text])
            if on_prepared is not None:
                on_prepared(prepared)
            for piece in stream:
                pieces.append(piece)
                yield piece
            text = "".join(pieces)
            completion = replace(ended[0], text=text) if ended else None
            response = self._response(user, prepared, completion, answer_id, text)
            if remember:
                response.memory = self._remember(user, prepared, response, keep)
        if on_done is not None:
            on_done(response)

    def _complete(
        self,
        user: str,
        prompt: str | Sequence[dict[str, str]],
        plan: Plan,
        sampling: SamplingConfig,
        style: PromptStyle,
        remember: bool = False,
    ) -> Drawn:
        """Prepare the plan's prompts and let its decoder draw the answer (the caller holds
        the LLM lock)."""
        prepared = self._prepare_all(user, prompt, plan.prompts, sampling, style, remember)
        chosen, text, completion = plan.decoder.draw(Drawer(self.llm), prepared, sampling, style)
        return replace(chosen, strategy=plan.name), text, completion

    # --- memory and feedback ----------------------------------------------------------------

    def _answer_id(self, user: str, answer_id: str | None, remember: bool) -> str:
        """`answer_id` checked (with memory on: not one of `user`'s kept answers yet), or a
        new id."""
        if answer_id is None:
            return new_answer_id()
        answer_id = validate_answer_id(answer_id)
        if remember and self.store.has_user(user):
            try:
                self.store.answer(user, answer_id)
            except AnswerNotFoundError:
                return answer_id
            raise InvalidInputError(
                f"The answer id {answer_id!r} is already used for {user!r}.", field="answer_id"
            )
        return answer_id

    def _remember(
        self,
        user: str,
        prepared: Prepared,
        response: Response,
        keep: Callable[[], bool] | None = None,
    ) -> Memory:
        """Store the user's turn (kind "turn", linked to the answer by its id) and keep the
        answer, unless `keep` says its reader has gone; a turn that cannot be stored is
        reported, not raised: the answer stands."""
        if keep is not None and not keep():
            return Memory(False, reason="The answer's reader left before its end; not remembered.")
        text = prepared.request
        if len(text) > self.remember_max_chars:
            return Memory(
                False,
                reason=f"The turn has {len(text):,} characters, over the memory's limit of "
                f"{self.remember_max_chars:,}; it was not remembered.",
            )
        turn = NewItem(text=text, kind=TURN_KIND, metadata={"answer_id": response.id})
        try:
            text = validate_items([turn])[0].text
            further = vector_texts(text)[1:]
            vector = prepared.request_vector
            if vector is None:
                vector = self.embedder.embed_one(text)
            if further:  # a long turn: its parts too
                vector = np.vstack([vector, self.embedder.embed(further)])
            item_id = self.store.remember(
                user,
                turn,
                vector,
                answer_id=response.id,
                answer=response.text,
                strategy=response.strategy,
            )
        except InvalidInputError as exc:
            return Memory(False, reason=f"{exc} It was not remembered.")
        return Memory(True, item_id)

    def feedback(
        self,
        user: str,
        answer_id: str,
        *,
        rating: int | None = None,
        edit: str | None = None,
    ) -> Feedback:
        """Say how an answer (kept with memory on) went for `user`: `rating` +1 or -1, or
        `edit`, the text the user kept instead. An edit is the user's own writing: it is
        stored as a history item of kind "edit" (metadata: the answer id and its request)
        and personalizes later answers. One of the two; an answer that is not `user`'s (or
        not kept) is an AnswerNotFoundError, and nothing is stored."""
        answer_id = validate_answer_id(answer_id)
        check_rating(rating, edit is not None)
        record = self.store.answer(user, answer_id)  # before anything is embedded
        if edit is None:
            return self.store.add_feedback(user, answer_id, rating=rating)
        item = validate_items(
            [
                NewItem(
                    text=edit,
                    kind=EDIT_KIND,
                    metadata={
                        "answer_id": answer_id,
                        "request": record.request[:LINKED_REQUEST_CHARS],
                    },
                )
            ]
        )[0]
        vectors = self.embedder.embed(vector_texts(item.text))
        return self.store.add_feedback(user, answer_id, edit=item, vector=vectors)

    def export_feedback(self, user: str, folder: str | Path, split: str = "train") -> int:
        """Write `user`'s edits and well-rated answers as a LaMP-format task ("chat") in
        `folder` (`{split}_questions.json`, `{split}_outputs.json`), the form `train-plug`
        reads: each question is a request, its profile the history the user had when it was
        answered (without the request itself), its output the text the user kept (their
        edit, else the answer if they rated it +1). Returns how many questions."""
        from .tasks.lamp import (  # evaluation's module: not on the generate path
            CHAT_TASK,
            write_split,
        )

        answers = self.store.answers(user)
        items = list(self.store.iter_items(user))
        questions, golds = [], []
        for answer in answers:
            kept = answer.edit
            if kept is None and answer.rating == 1:
                kept = answer.text
            if kept is None or not kept.strip():
                continue
            profile = _profile(answer, items)
            questions.append({"id": answer.answer_id, "input": answer.request, "profile": profile})
            golds.append({"id": answer.answer_id, "output": kept})
        write_split(folder, split, CHAT_TASK, questions, golds)
        return len(questions)

    @staticmethod
    def _response(
        user: str,
        prepared: Prepared,
        completion: Completion | None,
        answer_id: str,
        text: str | None = None,
    ) -> Response:
        found = prepared.personalization
        return Response(
            text=completion.text if completion is not None else text or "",
            user=user,
            strategy=prepared.strategy,
            context_ids=[i.id for i in found.context],
            dropped_context=prepared.dropped_context,
            soft_tokens=0 if found.soft_tokens is None else len(found.soft_tokens),
            completion=completion,
            id=answer_id,
        )


def _profile(answer: AnswerRecord, items: Sequence[Any]) -> list[dict[str, Any]]:
    """The history `answer` was given with, as LaMP profile entries (oldest first): items
    written by then, less the request itself and anything linked to this answer."""
    before = [
        i
        for i in items
        if i.created_at <= answer.created_at
        and i.id != answer.turn_id
        and i.metadata.get("answer_id") != answer.answer_id
    ]
    return [
        {"id": str(i.id), "text": i.text, "date": i.created_at, "kind": i.kind}
        for i in before[-PROFILE_ITEMS:]
    ]


def _as_messages(prompt: str | Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Validated chat messages; a plain string is one user turn."""
    if isinstance(prompt, str | bytes):
        return [{"role": "user", "content": validate_items([prompt])[0].text}]
    if not isinstance(prompt, Sequence):
        raise InvalidInputError(
            f"The prompt must be text or a list of chat messages, not {type(prompt).__name__}.",
            field="messages",
        )
    messages = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise InvalidInputError(
                f"Message {i} must be an object with role system, user or assistant.",
                field="messages",
            )
        content = m.get("content")
        if m["role"] == "user":
            content = validate_items([content])[0].text
        else:  # every role's text is checked the same way, not only the user's
            content = as_text(content, f"content of message {i}", None)
            if "\x00" in content:
                raise InvalidInputError(f"Message {i} contains a NUL byte.", field="messages")
        messages.append({"role": m["role"], "content": content})
    if not any(m["role"] == "user" for m in messages):
        raise InvalidInputError("The messages contain no user turn.", field="messages")
    return messages
