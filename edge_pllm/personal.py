"""`PersonalLLM`: the one class most callers need.

from edge_pllm import PersonalLLM
pllm = PersonalLLM()                       # default bundle, default home
pllm.add("alice", ["...", "..."])          # history, embedded once at insert
print(pllm.generate("alice", "...").text)  # personalized by retrieval (rag)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import paths
from .bundle import Bundle, Placement, load_bundle
from .defaults import ensure_default_bundle
from .embedder import Embedder
from .errors import InvalidInputError
from .head import PlugHead
from .items import NewItem, as_text, validate_items, validate_user
from .llm import LLM, Completion, LLMConfig, SamplingConfig
from .prompts import DEFAULT_STYLE, PromptStyle, fit_prompt
from .store import HistoryStore
from .strategies import Personalization, Request, Strategy, get_strategy

DEFAULT_STRATEGY = "rag"


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


@dataclass
class Prepared:
    """A prompt ready to generate from (templated text plus optional soft tokens)."""

    prompt: str
    personalization: Personalization
    strategy: str
    dropped_context: int
    placement: Placement = "prefix"  # where the soft tokens go (the head says)


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
    ):
        """`passphrase` opens (or creates) the history database encrypted at rest
        (SQLCipher; needs `pip install 'edge-pllm[encryption]'`)."""
        self.home = paths.home(home)
        bundle_path = Path(bundle) if bundle is not None else ensure_default_bundle(self.home)
        self.bundle: Bundle = load_bundle(bundle_path)
        spec = self.bundle.embedder
        self.embedder = Embedder(
            self.bundle.file(spec.file), self.bundle.file(spec.tokenizer), spec.config
        )
        self.store = HistoryStore(
            paths.database_path(self.home), spec.config.dim, passphrase=passphrase
        )
        self.llm_config = llm_config or LLMConfig()
        self.system_prompt = system_prompt
        self._llm: LLM | None = None
        self._plug: PlugHead | None = None
        self._llm_lock = threading.RLock()

    @property
    def llm(self) -> LLM:
        """The language model, loaded on first use (adding history does not need it)."""
        with self._llm_lock:
            if self._llm is None:
                self._llm = LLM(self.bundle.file(self.bundle.llm.file), self.llm_config)
            return self._llm

    @property
    def plug(self) -> PlugHead | None:
        """The bundle's Persona-Plug head, loaded on first use; None if the bundle has none.
        BundleError if it has one that does not fit it (`Bundle.plug_error` says why)."""
        has_head = self.bundle.plug is not None or self.bundle.plug_error is not None
        if self._plug is None and has_head:
            self._plug = PlugHead(self.bundle)
        return self._plug

    def close(self) -> None:
        self.store.close()

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
        """Add history for `user`, embedding it once; all items land, or none do."""
        if isinstance(items, str | bytes | NewItem | dict):
            items = [items]  # type: ignore[list-item]
        user = validate_user(user)
        checked = validate_items(items)
        vectors = self.embedder.embed([i.text for i in checked], progress=progress)
        return self.store.add(user, checked, vectors)

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

    def _drop_cached_prompt(self) -> None:
        with self._llm_lock:
            if self._llm is not None:
                self._llm.reset()

    # --- generation ---------------------------------------------------------------------------

    def prepare(
        self,
        user: str,
        prompt: str | Sequence[dict[str, str]],
        strategy: str | Strategy = DEFAULT_STRATEGY,
        sampling: SamplingConfig | None = None,
        style: PromptStyle = DEFAULT_STYLE,
    ) -> Prepared:
        """Personalize `prompt` (a request, or chat messages whose last user turn is the
        request) for `user`: the templated text and soft tokens to generate from."""
        user = validate_user(user)
        messages = _as_messages(prompt)
        query = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        chosen = get_strategy(strategy)
        sampling = sampling or SamplingConfig()
        plug = self.plug if chosen.needs_head else None
        found = chosen.personalize(Request(user, query, self.store, self.embedder, plug))
        llm = self.llm
        n_soft = 0 if found.soft_tokens is None else len(found.soft_tokens)
        text, kept = fit_prompt(
            messages,
            found.context,
            render=llm.apply_chat_template,
            count_tokens=llm.count_tokens,
            budget=llm.n_ctx - sampling.max_tokens - n_soft,
            n_ctx=llm.n_ctx,
            max_tokens=sampling.max_tokens,
            soft_tokens=n_soft,
            system=self.system_prompt,
            style=style,
        )
        dropped = len(found.context) - len(kept)
        found.context = kept
        placement = plug.placement if plug is not None else "prefix"
        return Prepared(text, found, chosen.name, dropped, placement)

    def generate(
        self,
        user: str,
        prompt: str | Sequence[dict[str, str]],
        *,
        strategy: str | Strategy = DEFAULT_STRATEGY,
        sampling: SamplingConfig | None = None,
        style: PromptStyle = DEFAULT_STYLE,
    ) -> Response:
        """Generate an answer to `prompt` personalized by `user`'s history."""
        sampling = sampling or SamplingConfig()
        with self._llm_lock:
            prepared = self.prepare(user, prompt, strategy, sampling, style)
            completion = self.llm.complete(
                prepared.prompt,
                prepared.personalization.soft_tokens,
                sampling,
                prepared.placement,
            )
        return self._response(user, prepared, completion)

    def stream(
        self,
        user: str,
        prompt: str | Sequence[dict[str, str]],
        *,
        strategy: str | Strategy = DEFAULT_STRATEGY,
        sampling: SamplingConfig | None = None,
        style: PromptStyle = DEFAULT_STYLE,
        on_prepared: Callable[[Prepared], None] | None = None,
    ) -> Iterator[str]:
        """Like `generate`, yielding text as it is produced; `on_prepared` sees what
        personalized the prompt before the first piece."""
        sampling = sampling or SamplingConfig()
        with self._llm_lock:
            prepared = self.prepare(user, prompt, strategy, sampling, style)
            if on_prepared is not None:
                on_prepared(prepared)
            yield from self.llm.stream(
                prepared.prompt,
                prepared.personalization.soft_tokens,
                sampling,
                prepared.placement,
            )

    @staticmethod
    def _response(user: str, prepared: Prepared, completion: Completion) -> Response:
        found = prepared.personalization
        return Response(
            text=completion.text,
            user=user,
            strategy=prepared.strategy,
            context_ids=[i.id for i in found.context],
            dropped_context=prepared.dropped_context,
            soft_tokens=0 if found.soft_tokens is None else len(found.soft_tokens),
            completion=completion,
        )


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
