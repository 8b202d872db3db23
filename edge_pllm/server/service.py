"""The endpoints over one PersonalLLM (and the registered models it can answer with):
generation in threads of its own, streamed or not, history, search, feedback, models."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UnknownModelError
from ..inference.llm import SamplingConfig
from ..inference.model_registry import list_models
from ..personal import PersonalLLM, Prepared
from ..personal import Response as Answer
from ..storage.items import validate_user
from . import schema
from ._web import JSONResponse, Request, Response, StreamingResponse
from .errors import HTTPError, error_body
from .settings import GENERATION_THREADS, ServerConfig


def _fingerprint(soft: np.ndarray | None) -> str | None:
    if soft is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(soft, dtype=np.float32).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class _Head:
    """What every chunk of one streamed answer repeats."""

    id: str
    created: int
    chat: bool
    model: str

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(answer: Answer) -> dict[str, int]:
    """The answer's token counts as OpenAI reports them (the prompt's count includes the
    soft tokens: each takes a position in the context)."""
    done = answer.completion
    prompt = done.prompt_tokens if done is not None else 0
    completion = done.completion_tokens if done is not None else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _finish(answer: Answer) -> str:
    """Why generation ended: llama.cpp's reason ("length" when `max_tokens` ran out)."""
    return answer.completion.finish_reason if answer.completion is not None else "stop"


def _still_there(request: Request, loop: asyncio.AbstractEventLoop) -> bool:
    """From a worker thread: whether the client of `request` is still connected (asked on
    the event loop, where the connection lives). A loop that does not answer within a few
    seconds is shutting down: nobody is there to read the answer."""
    try:
        asked = asyncio.run_coroutine_threadsafe(request.is_disconnected(), loop)
        return not asked.result(timeout=5)
    except (TimeoutError, RuntimeError, concurrent.futures.CancelledError):
        return False


class Service:
    """The HTTP layer over one PersonalLLM."""

    def __init__(self, pllm: PersonalLLM, config: ServerConfig):
        self.pllm, self.config = pllm, config
        self.model_id = f"edge-pllm/{pllm.model or pllm.base_bundle.name}"
        # Every model answered with so far, least recently used first (`runtime`), by name;
        # each with the sha256 of the file it was made for (a name registered again anew).
        self._runtimes: OrderedDict[str | None, PersonalLLM] = OrderedDict({pllm.model: pllm})
        self._made_for: dict[str | None, str | None] = {pllm.model: None}
        self._runtimes_lock = threading.Lock()
        # Held while one model makes room and loads: `max_loaded` holds across loading.
        self._loading_lock = threading.Lock()
        # Model work waits for the runtime's one llama context in threads of its own, so
        # the default executor stays free for history and search requests meanwhile.
        self._generation = ThreadPoolExecutor(GENERATION_THREADS, "edge-pllm-generation")
        self._busy = 0  # requests waiting for the model or generating
        self._busy_lock = threading.Lock()
        self._plug: bool | None = None  # whether the head answers, once known

    def close(self) -> None:
        """At shutdown: requests still waiting for the model are dropped (one generating
        ends first)."""
        self._generation.shutdown(wait=False, cancel_futures=True)

    @property
    def in_flight(self) -> int:
        """How many requests are waiting for the model or generating now."""
        return self._busy

    def _model_work(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run `fn` (model work) in a generation thread, counted in `in_flight`."""

        def counted() -> Any:
            try:
                return fn()
            finally:
                with self._busy_lock:
                    self._busy -= 1

        with self._busy_lock:
            self._busy += 1
        return self._generation.submit(counted)

    # --- models ------------------------------------------------------------------------------

    def known(self) -> dict[str, str | None]:
        """Every model id this server answers to: the bundle's LLM and each registered
        model (`edge-pllm models add`), each with its registered name (None: the bundle's)."""
        return {self.id_of(name): name for name in self._registered()}

    def _registered(self) -> dict[str | None, str | None]:
        """Each model's name (None: the bundle's LLM) and the sha256 of its file (None for
        the bundle's), as registered now."""
        found: dict[str | None, str | None] = {None: None}
        found.update({m.name: m.sha256 for m in list_models(self.pllm.home)})
        return found

    def id_of(self, name: str | None) -> str:
        """The id a client names a model by: `edge-pllm/NAME` (the bundle's own LLM: the
        bundle's name)."""
        return f"edge-pllm/{name or self.pllm.base_bundle.name}"

    def runtime(self, model: str | None) -> PersonalLLM:
        """The runtime answering with `model` (an id from `known`, or its bare name; None:
        the one the server was started with). UnknownModelError (404) for another name."""
        if model is None or model == self.model_id:
            return self.pllm
        registered = self._registered()
        known = {self.id_of(name): name for name in registered}
        key = model if model in known else self.id_of(model)
        if key not in known:
            raise UnknownModelError(model, list(known))
        name = known[key]
        with self._runtimes_lock:
            runtime = self._runtimes.get(name)
            if runtime is not None and self._made_for[name] != registered[name]:
                # Registered again (another file under the same name): a runtime of its own;
                # the old one is let go once the generation it may be running ends.
                self._generation.submit(runtime.close)
                runtime = None
            if runtime is None:
                runtime = self._runtimes[name] = self.pllm.with_model(name)
                self._made_for[name] = registered[name]
            return runtime

    @contextlib.contextmanager
    def _room(self, runtime: PersonalLLM) -> Iterator[None]:
        """Held while `runtime` generates (in a generation thread): the least recently used
        other models are unloaded so that at most `max_loaded` stay in memory, and
        `runtime` is loaded and held, one model at a time, so that two requests for two
        models never both load past the limit. Unloading a model waits for its generation
        to end; meanwhile other models wait their turn to make room."""
        with contextlib.ExitStack() as held:
            with self._loading_lock:
                with self._runtimes_lock:
                    if self._runtimes.get(runtime.model) is runtime:
                        self._runtimes.move_to_end(runtime.model)
                    others = [r for r in self._runtimes.values() if r is not runtime and r.loaded]
                for other in others[: max(0, len(others) - (self.config.max_loaded - 1))]:
                    other.unload()
                held.enter_context(runtime.in_use())
            yield

    # --- plumbing --------------------------------------------------------------------------

    async def body(self, request: Request) -> bytes:
        """The request body, refused with 413 as soon as it passes `max_body_bytes` (chunked
        bodies included: the limit applies while reading), and with 408 when the client
        stalls for `read_timeout` seconds or the whole body takes over `body_timeout` (a
        byte every few seconds is no way to hold a connection)."""
        limit = self.config.max_body_bytes
        too_large = HTTPError(413, f"Request body over {limit} bytes.", "invalid_request_error")
        length = request.headers.get("content-length", "")
        if length.isascii() and length.isdigit() and len(length) < 20 and int(length) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        stream = request.stream().__aiter__()
        loop = asyncio.get_running_loop()
        ends = loop.time() + self.config.body_timeout
        while True:
            left = ends - loop.time()
            try:
                if left <= 0:
                    raise TimeoutError
                chunk = await asyncio.wait_for(anext(stream), min(self.config.read_timeout, left))
            except StopAsyncIteration:
                break
            except TimeoutError:
                late = loop.time() >= ends
                message = (
                    f"The request body took over {self.config.body_timeout:g} s."
                    if late
                    else f"The request body stalled for {self.config.read_timeout:g} s."
                )
                raise HTTPError(408, message, "invalid_request_error") from None
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def sampling(self, req: schema.GenerationRequest) -> SamplingConfig:
        max_tokens = (
            req.max_tokens or req.max_completion_tokens or min(128, self.config.max_tokens_limit)
        )
        if max_tokens > self.config.max_tokens_limit:
            raise HTTPError(
                400,
                f"max_tokens must be 1..{self.config.max_tokens_limit}.",
                "invalid_request_error",
                "max_tokens",
            )
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return SamplingConfig(
            max_tokens=max_tokens,
            temperature=0.0 if req.temperature is None else req.temperature,
            top_p=0.95 if req.top_p is None else req.top_p,
            stop=stop,
            # As OpenAI: no seed, a fresh draw each time (a client's "regenerate" differs).
            seed=secrets.randbelow(2**31) if req.seed is None else req.seed,
        )

    def personalization(
        self, req: schema.ChatRequest | schema.CompletionRequest
    ) -> tuple[str, str, bool]:
        """Whose history, which strategy, and whether to remember the turn."""
        user = req.user or self.config.default_user
        if not user:
            raise HTTPError(
                400,
                "'user' is required: it selects whose history personalizes the answer.",
                "invalid_request_error",
                "user",
            )
        strategy = (req.edge_pllm and req.edge_pllm.strategy) or self.config.default_strategy
        remember = req.edge_pllm.remember if req.edge_pllm else None
        return user, strategy, self.config.remember if remember is None else remember

    @staticmethod
    def extension(prepared: Prepared, answer: Answer | None = None) -> dict[str, Any]:
        found = prepared.personalization
        info = {
            "strategy": prepared.strategy,
            "context_ids": [i.id for i in found.context],
            "dropped_context": prepared.dropped_context,
            "soft_tokens": 0 if found.soft_tokens is None else len(found.soft_tokens),
            "soft_tokens_sha256": _fingerprint(found.soft_tokens),
            **({"fallback": found.info["fallback"]} if "fallback" in found.info else {}),
            **({"opening": found.answer_start} if found.answer_start else {}),
        }
        if answer is not None and answer.memory is not None:
            info["memory"] = answer.memory.to_json()
        return info

    # --- generation ------------------------------------------------------------------------

    async def complete(self, request: Request, chat: bool) -> Response:
        raw = await self.body(request)
        req: schema.GenerationRequest
        prompt: Any
        if chat:
            req = schema.parse(schema.ChatRequest, raw)
            prompt = [m.as_dict() for m in req.messages]
        else:
            req = schema.parse(schema.CompletionRequest, raw)
            prompt = req.text
        user, strategy, remember = self.personalization(req)
        sampling = self.sampling(req)
        pllm = await asyncio.to_thread(self.runtime, req.model)
        created = int(time.time())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = _Head(rid, created, chat, self.id_of(pllm.model))
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self.stream(
                request, pllm, head, user, prompt, strategy, sampling, remember, usage
            )
        loop = asyncio.get_running_loop()
        prepared_box: list[Prepared] = []

        def work() -> Answer:
            with self._room(pllm):
                return pllm.generate(
                    user,
                    prompt,
                    strategy=strategy,
                    sampling=sampling,
                    on_prepared=prepared_box.append,
                    remember=remember,
                    answer_id=rid,
                    keep=lambda: _still_there(request, loop),
                )

        answer = await asyncio.wrap_future(self._model_work(work))
        text = answer.text
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": _finish(answer),
            "logprobs": None,
        }
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": head.model,
                "choices": [choice],
                "usage": _usage(answer),
                "edge_pllm": self.extension(prepared_box[0], answer),
            }
        )

    async def stream(
        self,
        request: Request,
        pllm: PersonalLLM,
        head: _Head,
        user: str,
        prompt: Any,
        strategy: str,
        sampling: SamplingConfig,
        remember: bool = False,
        include_usage: bool = False,
    ) -> Response:
        """SSE. Preparation (where bad requests fail) happens before the 200 is sent. When
        the client goes away, generation stops at the next piece; with memory on, the turn
        is stored only once every piece was sent and the client is still there. The last
        chunk of a stream that ends says what was stored; with `include_usage`, a chunk
        with the usage and no choices follows it, as OpenAI sends."""
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[Prepared] = loop.create_future()
        gone = threading.Event()  # the client left before the end

        def delivered() -> bool:
            """Asked before the turn is stored: every piece sent, and the client there. A
            client that is there but reads slowly holds the model for `read_timeout` at
            most: its turn is then stored (it has not left)."""
            sent = threading.Event()
            loop.call_soon_threadsafe(queue.put_nowait, ("flush", sent))
            ends = time.monotonic() + self.config.read_timeout
            while not sent.wait(0.05) and time.monotonic() < ends:
                if gone.is_set():
                    return False
            return not gone.is_set()

        def producer() -> None:
            def prepared_cb(p: Prepared) -> None:
                loop.call_soon_threadsafe(ready.set_result, p)

            done: list[Answer] = []
            try:
                with self._room(pllm):  # may load the model: its errors are delivered too
                    pieces = pllm.stream(
                        user,
                        prompt,
                        strategy=strategy,
                        sampling=sampling,
                        on_prepared=prepared_cb,
                        remember=remember,
                        answer_id=head.id,
                        on_done=done.append,
                        keep=delivered,
                    )
                    try:
                        for piece in pieces:
                            if gone.is_set():
                                return  # the stream closed below: interrupted, not kept
                            loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
                        loop.call_soon_threadsafe(queue.put_nowait, ("end", done[0]))
                    finally:
                        pieces.close()  # type: ignore[attr-defined]
            except Exception as exc:  # delivered to the client, as an error or an event
                if not ready.done():
                    loop.call_soon_threadsafe(ready.set_exception, exc)
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

        self._model_work(producer)
        prepared = await ready  # raises the typed error -> proper 4xx before streaming
        info = self.extension(prepared)

        def chunk(
            delta: str | None, finish: str | None, first: bool = False, answer: Answer | None = None
        ) -> str:
            if head.chat:
                d: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if delta:
                    d["content"] = delta
                choice: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish}
            extension = info if answer is None else self.extension(prepared, answer)
            payload = {**head.chunk([choice]), "edge_pllm": extension}
            if include_usage:
                payload["usage"] = None
            return _event(payload)

        async def events() -> AsyncIterator[str]:
            try:
                if head.chat:
                    yield chunk(None, None, first=True)
                while True:
                    kind_, value = await queue.get()
                    if kind_ == "piece":
                        yield chunk(value, None)
                    elif kind_ == "flush":
                        if await request.is_disconnected():
                            gone.set()
                        value.set()
                    elif kind_ == "end":
                        yield chunk(None, _finish(value), answer=value)
                        if include_usage:
                            yield _event({**head.chunk([]), "usage": _usage(value)})
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        _, err = error_body(value)
                        yield _event(err)
                        return
            finally:
                gone.set()  # harmless once the producer is done; stops it if not

        return StreamingResponse(events(), media_type="text/event-stream")

    # --- history ---------------------------------------------------------------------------

    async def add_history(self, request: Request) -> Response:
        user = _user(request)
        items = schema.parse(schema.HistoryRequest, await self.body(request)).item_list()
        ids = await asyncio.to_thread(self.pllm.add, user, items)
        return JSONResponse({"user": user, "ids": ids}, status_code=201)

    async def list_history(self, request: Request) -> Response:
        user = _user(request)
        limit = schema.query_int(request.query_params, "limit", 20, schema.MAX_LIMIT)
        items = await asyncio.to_thread(lambda: self.pllm.store.items(user, limit=limit))
        return JSONResponse({"user": user, "items": [{"id": i.id, **i.to_json()} for i in items]})

    async def search(self, request: Request) -> Response:
        user = _user(request)
        query = request.query_params.get("q", "")
        if not query.strip():
            raise HTTPError(400, "Give a query with ?q=.", "invalid_request_error", "q")
        k = schema.query_int(request.query_params, "k", 5, schema.MAX_K)

        def work() -> list[dict[str, Any]]:
            hits = self.pllm.search(user, query, k)
            return [
                {
                    "id": h.item.id,
                    "distance": h.distance,
                    **h.item.to_json(),
                    "part": h.part.to_json() if h.part else None,
                    "passage": h.passage.text,
                }
                for h in hits
            ]

        return JSONResponse({"user": user, "hits": await asyncio.to_thread(work)})

    async def feedback(self, request: Request) -> Response:
        user = _user(request)
        req = schema.parse(schema.FeedbackRequest, await self.body(request)).checked()
        done = await asyncio.to_thread(
            self.pllm.feedback, user, req.answer_id, rating=req.rating, edit=req.edit
        )
        return JSONResponse(
            {
                "user": user,
                "answer_id": done.answer_id,
                "rating": done.rating,
                "edit_id": done.edit_id,
            },
            status_code=201,
        )

    async def delete_item(self, request: Request) -> Response:
        user = _user(request)
        item = schema.item_id(request.path_params["item"])
        await asyncio.to_thread(self.pllm.delete, user, [item])
        return JSONResponse({"user": user, "deleted": [item]})

    async def forget(self, request: Request) -> Response:
        user = _user(request)
        n = await asyncio.to_thread(self.pllm.forget, user)
        return JSONResponse({"user": user, "forgotten_items": n})

    async def export(self, request: Request) -> Response:
        user = _user(request)

        def work() -> str:
            return "".join(
                json.dumps(i.to_json(), ensure_ascii=False) + "\n"
                for i in self.pllm.store.iter_items(user)
            )

        text = await asyncio.to_thread(work)
        return Response(text, media_type="application/x-ndjson")

    async def models(self, request: Request) -> Response:
        if self._plug is None:  # known for good once asked (it may load the model once)
            self._plug = await asyncio.to_thread(self.pllm.head_usable)
        base = self.pllm.base_bundle
        head = base.plug.llm_sha256 if base.plug is not None else None
        data = []
        for record in await asyncio.to_thread(self._descriptions):
            name, quantization, sha = record
            served = name == self.pllm.model
            data.append(
                {
                    "id": self.id_of(name),
                    "object": "model",
                    "created": 0,
                    "owned_by": "edge-pllm",
                    "quantization": quantization,
                    "plug": self._plug if served else (head is not None and sha in (None, head)),
                }
            )
        return JSONResponse({"object": "list", "data": data})

    def _descriptions(self) -> list[tuple[str | None, str, str | None]]:
        """(registered name, quantization, sha256) of every model: the bundle's first."""
        base = self.pllm.base_bundle
        models = [(None, base.llm.quantization, None)]
        return models + [(m.name, m.quantization, m.sha256) for m in list_models(self.pllm.home)]


def _user(request: Request) -> str:
    """The user named in the URL path, exactly as given (never folded), or a 400."""
    return validate_user(request.path_params["user"])
