"""A thin wrapper over llama-cpp-python: chat template, generation, and soft tokens.

Soft tokens are fed the way llama.cpp's multimodal paths do it: a `llama_batch` whose `embd`
array is filled instead of `token`, decoded at the positions that follow the KV cache.
Then `Llama.n_tokens` and `Llama.input_ids` are advanced over placeholder ids, so that
`Llama.generate` (which prefix-matches the prompt against `input_ids`) keeps them in the
cache instead of silently evaluating the prompt without them.

Where they go (`Placement`): `prefix`, in front of the prompt (after a BOS), as the PPlug
paper does; or `before_answer`, between the templated request and the answer's header
(the chat template's generation prompt), so that the request's keys and values do not
depend on the persona: a head trained that way is cheap to train, and the request's
prefix is shared by every strategy and user.

The KV cache of the previous call is reused for the longest common prefix, where a soft
token matches only a soft token with the very same bytes (its sha256). Placeholder ids
alone would let one user's soft tokens stand in for another's; the hashes make reuse
exact, so a repeated prompt skips its prefill and a different persona never shares state.

A head may come with a task adapter (a GGUF LoRA, `load_adapter`): llama.cpp applies it
from the soft tokens on, never to the tokens before them, as the head was trained. The
request's keys and values are then the plain model's, still shared by every strategy, and
a prompt without soft tokens is the plain model's prompt.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..cpus import llm_threads
from ..errors import (
    BundleError,
    ContextOverflowError,
    InvalidInputError,
    LLMError,
    SoftTokenShapeError,
)
from .bundle import PLACEMENTS, Placement
from .token_rows import TokenRows

_BYTE_BOUNDED_VOCABS = (1, 2)  # llama_vocab_type: SPM, BPE (see `LLM.most_tokens`)
# Architectures whose input embeddings llama.cpp multiplies by sqrt(n_embd) for tokens
# but not for embeddings passed in a batch: the caller must apply the scale.
_SCALED_INPUT_ARCHS = {"gemma", "gemma2", "gemma3", "gemma3n"}
_PLACEHOLDER_ID = 0
# Answers one context decodes side by side (`LLM.draw`). llama.cpp allows 256 sequences,
# but with 64 of them in one batch some answers came out other than drawn alone (llama-cpp-
# python 0.3.36); up to 63 they were all the same. Consensus needs 17 at most.
MAX_SEQUENCES = 32


@dataclass(frozen=True)
class LLMConfig:
    """How to load the model. `n_threads`: decode threads (None: one per physical core,
    `cpus.llm_threads`); prompts are always evaluated on every CPU the process may use."""

    n_ctx: int = 2048
    n_batch: int = 512
    n_threads: int | None = None
    seed: int = 0
    prefix_cache: bool = True  # reuse the KV cache of the previous call's common prefix


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample. temperature 0 is greedy and deterministic."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.1
    stop: tuple[str, ...] = ()
    seed: int | None = None  # of a sampled answer; None: the model's `LLMConfig.seed`

    def __post_init__(self) -> None:
        # llama.cpp reads max_tokens ≤ 0 as "until the context is full" and takes NaN as a
        # temperature: refuse both rather than generate without bound or at random.
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise InvalidInputError("max_tokens must be an integer.", field="max_tokens")
        if self.max_tokens < 1:
            raise InvalidInputError(
                f"max_tokens must be at least 1 (got {self.max_tokens}).", field="max_tokens"
            )
        for name in ("temperature", "top_p", "repeat_penalty"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise InvalidInputError(
                    f"{name} must be a finite number ≥ 0 (got {value!r}).", field=name
                )
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed < 2**31
        ):
            raise InvalidInputError(
                f"seed must be an integer 0..2^31-1 (got {self.seed!r}).", field="seed"
            )


@dataclass
class Completion:
    """A finished generation and what it cost."""

    text: str
    finish_reason: str
    prompt_tokens: int
    soft_tokens: int
    completion_tokens: int
    # Prompt positions not computed for it: reused from the previous call's KV cache, or
    # (a later prompt of `LLM.draw_each`) shared with the first prompt of the same call.
    cached_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    ids: tuple[int, ...] = ()  # the generated token ids, when the caller asked for them

    @property
    def decode_tokens_per_second(self) -> float:
        return self.completion_tokens / self.decode_seconds if self.decode_seconds else 0.0


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first of the `stop` strings in it (as llama-cpp-python cuts it)."""
    return text[: min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))]


@dataclass(frozen=True)
class Ask:
    """A prompt to answer once per sampling (`LLM.draw_each`), soft rows where `placement`
    puts them."""

    prompt: str
    soft: np.ndarray | None
    samplings: tuple[SamplingConfig, ...]
    placement: Placement = "prefix"


@dataclass(frozen=True)
class _Part:
    """An Ask's checked soft rows and token ids, before and after where they go."""

    soft: np.ndarray | None
    before: list[int]
    after: list[int]
    placement: Placement
    samplings: tuple[SamplingConfig, ...]

    @property
    def n_prompt(self) -> int:
        return len(self.before) + len(self.after) + (0 if self.soft is None else len(self.soft))

    @property
    def held(self) -> list[int]:
        """The tokens the cache holds from the start once its prompt is in, up to the soft
        rows (all of them without)."""
        return self.before if self.soft is not None else self.after


def _shared(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` have in common."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _alike(
    live: Sequence[int], prompt_of: Sequence[int], ids: Sequence[Sequence[int]]
) -> list[list[int]]:
    """`live` answers grouped by their prompt and every token they have so far, first seen
    first: the answers of a group need one batch row between them, its keys and values one
    cell for them all (a token of several sequences), and read the same logits. Answers
    that sampled alike so far are the same sequence of tokens, bit for bit, so their next
    logits are too; where they part, each goes on in its own cells after the shared ones."""
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for seq in live:
        groups.setdefault((prompt_of[seq], tuple(ids[seq])), []).append(seq)
    return list(groups.values())


def _in_turns(
    samplings: Sequence[SamplingConfig], n_prompt: int, n_ctx: int, most: int
) -> list[list[SamplingConfig]]:
    """`samplings` in turns of at most `most` answers whose sequences fit one cache of
    `n_ctx` cells together: the prompt's `n_prompt` once, then every answer's decoded
    tokens its own (one answer alone always fits: its prompt was checked against it)."""
    turns: list[list[SamplingConfig]] = [[]]
    cells = n_prompt
    for sampling in samplings:
        if turns[-1] and (len(turns[-1]) == most or cells + sampling.max_tokens - 1 > n_ctx):
            turns.append([])
            cells = n_prompt
        turns[-1].append(sampling)
        cells += sampling.max_tokens - 1
    return turns


def _row_key(row: np.ndarray) -> bytes:
    """Identity of a soft row in the prefix cache: the sha256 of its exact float32 bytes."""
    return hashlib.sha256(np.ascontiguousarray(row, dtype=np.float32).tobytes()).digest()


_SEQUENCES_LOCK = threading.Lock()


@contextlib.contextmanager
def _sequences(n: int) -> Iterator[None]:
    """While a Llama is made: its context holds `n` sequences in one unified KV cache (its
    cells shared: a sequence may reach any position, all of them together hold n_ctx
    tokens; `draw` decodes answers side by side). llama-cpp-python has no parameter for
    it: the defaults its constructor starts from are given those two fields, so that one
    context is made, not one and then its replacement (a second context cost 44-74 ms of
    every load, measured). Our LLMs are made one at a time (a lock); a Llama another part
    of the program makes in another thread at that very moment would get them too."""
    from llama_cpp import llama_cpp as raw

    with _SEQUENCES_LOCK:
        defaults = raw.llama_context_default_params

        def with_sequences() -> Any:
            params = defaults()
            params.n_seq_max = n
            params.kv_unified = True  # else each sequence would get n_ctx / n cells
            return params

        raw.llama_context_default_params = with_sequences
        try:
            yield
        finally:
            raw.llama_context_default_params = defaults


class LLM:
    """A GGUF model loaded in llama.cpp, with soft-token prefix support."""

    def __init__(
        self,
        model_path: str | Path,
        config: LLMConfig | None = None,
        chat_template: str | None = None,
    ):
        """Load the GGUF at `model_path`; `chat_template` (Jinja) stands in for the GGUF's."""
        import llama_cpp  # imported here: loading the shared library is not free

        self._lc = llama_cpp
        self.config = config or LLMConfig()
        self.path = Path(model_path)
        if not self.path.is_file():
            raise BundleError(f"The model file {self.path} does not exist.", file=str(self.path))
        decode_threads, prompt_threads = llm_threads()
        # A batch holds at most n_batch tokens: one per sequence at a step.
        self.max_sequences = min(MAX_SEQUENCES, self.config.n_batch)
        try:
            with (
                open(os.devnull, "w") as devnull,
                contextlib.redirect_stderr(devnull),
                _sequences(self.max_sequences),
            ):
                self._llama = llama_cpp.Llama(
                    model_path=str(self.path),
                    n_ctx=self.config.n_ctx,
                    n_batch=self.config.n_batch,
                    n_ubatch=self.config.n_batch,
                    n_threads=self.config.n_threads or decode_threads,
                    n_threads_batch=prompt_threads,
                    seed=self.config.seed,
                    # Its CPU kernel attends each query row alone, so a token's logits do
                    # not depend on what else its batch holds: answers drawn side by side
                    # (`draw`) are bit-identical to the same answers drawn one at a time
                    # where llama.cpp attends a lone token in one piece too (one decode
                    # thread, or fewer than 512 cached positions; else it splits the keys
                    # among the threads and a lone token's logits move with their number).
                    flash_attn=True,
                    verbose=False,
                )
        except ValueError as exc:
            raise BundleError(
                f"llama.cpp could not load {self.path} ({exc}); the file may be corrupt or of "
                "an unsupported architecture.",
                file=str(self.path),
            ) from exc
        if self._llama.context_params.n_seq_max != self.max_sequences:
            raise BundleError(  # the pinned llama-cpp-python makes its context as read here
                f"llama-cpp-python made a context for {self._llama.context_params.n_seq_max} "
                f"sequences, not {self.max_sequences}; reinstall the version edge-pllm pins.",
                file=str(self.path),
            )
        meta = self._llama.metadata
        self.architecture: str = meta.get("general.architecture", "unknown")
        self.chat_template: str | None = chat_template or meta.get("tokenizer.chat_template")
        self.n_embd: int = self._llama.n_embd()
        # llama.cpp rounds the context up (to a multiple of 256), but llama-cpp-python's
        # token buffer keeps the size asked for: the smaller one is what fits.
        self.n_ctx: int = min(self.config.n_ctx, self._llama.n_ctx())
        self.embed_scale: float = (
            math.sqrt(self.n_embd) if self.architecture in _SCALED_INPUT_ARCHS else 1.0
        )
        # sha256 of the soft row at each KV position that holds one (valid below n_tokens).
        self._soft_at: dict[int, bytes] = {}
        # A LoRA adapter (llama.cpp handle) that acts from the soft tokens on (`load_adapter`).
        self._adapter: Any = None
        self._adapter_on = False
        self.cached_tokens = 0  # positions the last call reused from the KV cache
        self._formatter = None
        # What the template adds after the last turn to start the answer (its generation
        # prompt, e.g. "<|im_start|>assistant\n"); "" without a template.
        self.answer_header = ""
        if self.chat_template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            model = self._llama._model
            eos, bos = self._llama.token_eos(), self._llama.token_bos()
            tokens = {
                "template": self.chat_template,
                "eos_token": model.token_get_text(eos) if eos != -1 else "",
                "bos_token": model.token_get_text(bos) if bos != -1 else "",
                "stop_token_ids": [eos] if eos != -1 else None,
            }
            self._formatter = Jinja2ChatFormatter(**tokens)
            probe = [{"role": "user", "content": "\x01"}]
            turn = Jinja2ChatFormatter(**tokens, add_generation_prompt=False)(messages=probe)
            full = self._formatter(messages=probe).prompt
            if full.startswith(turn.prompt):
                self.answer_header = full[len(turn.prompt) :]

    @property
    def llama(self) -> Any:
        """The underlying llama_cpp.Llama (for benchmarks and tests)."""
        return self._llama

    # --- text <-> tokens ----------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        """Render `messages` with the GGUF's own chat template, ending with the assistant turn."""
        if self._formatter is None:
            # A base model without a template: plain completion of the last message.
            return "\n\n".join(m["content"] for m in messages)
        return self._formatter(messages=list(messages)).prompt

    def tokenize(self, text: str) -> list[int]:
        """Token ids for `text`, with BOS when the model wants one (never twice)."""
        llama = self._llama
        ids = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        bos = llama.token_bos()
        if llama._model.add_bos_token() and bos != -1 and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def most_tokens(self, text: str) -> int:
        """At least `len(tokenize(text))`, without tokenizing, so that a prompt that fits by
        it needs no counting. For byte-level BPE and SentencePiece vocabularies: every token
        covers at least one byte, but a BOS and SentencePiece's leading space, which it puts
        before the text and after each special token (whose text is 2 bytes or more, and
        one token). Other vocabularies (WordPiece, Unigram's normalization that can lengthen
        text, ...) are not bounded: a number no budget reaches."""
        if self._llama._model.vocab_type() not in _BYTE_BOUNDED_VOCABS:
            return sys.maxsize
        return len(text.encode("utf-8")) + 2

    @functools.cached_property
    def _header_ids(self) -> list[int]:
        return self._llama.tokenize(self.answer_header.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._llama.detokenize(list(ids)).decode("utf-8", errors="replace")

    @functools.cached_property
    def eog_ids(self) -> frozenset[int]:
        """The vocabulary's end-of-generation tokens (EOS, end of turn, …)."""
        vocab = self._llama._model.vocab  # llama-cpp-python keeps the vocab there, unexposed
        return frozenset(
            t for t in range(self._llama.n_vocab()) if self._lc.llama_vocab_is_eog(vocab, t)
        )

    @functools.cached_property
    def line_break_ids(self) -> frozenset[int]:
        """The tokens whose text holds a line break."""
        llama = self._llama
        return frozenset(t for t in range(llama.n_vocab()) if b"\n" in llama.detokenize([t]))

    @functools.cached_property
    def token_rows(self) -> TokenRows | None:
        """The model's token-embedding rows as llama.cpp looks them up (None: not readable
        here; tokens after soft rows then take a decode pass of their own)."""
        return TokenRows.open(self.path)

    # --- soft tokens --------------------------------------------------------------------------

    def load_adapter(self, path: str | Path) -> None:
        """Load a GGUF LoRA adapter that acts exactly where soft tokens do: on the soft
        tokens and every position after them, never on the tokens before them. A head
        trained with a task adapter (`train-plug --adapter-rank`) saw the request through
        the plain model, so its keys and values stay shareable by every strategy and user."""
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"The adapter file {path} does not exist.", file=str(path))
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            adapter = self._lc.llama_adapter_lora_init(
                self._llama._model.model, str(path).encode("utf-8")
            )
        if not adapter:
            raise BundleError(
                f"llama.cpp could not load the adapter {path}: it is damaged or was made for "
                "another model; re-attach the head.",
                file=str(path),
            )
        self._use_adapter(False)
        self._adapter = adapter
        self.reset()  # nothing cached was computed with or without this adapter

    def _use_adapter(self, on: bool) -> None:
        """Set (or clear) the adapter on the context for the positions decoded next."""
        on = on and self._adapter is not None
        if on == self._adapter_on:
            return
        lc = self._lc
        if on:
            adapters = (lc.llama_adapter_lora_p_ctypes * 1)(self._adapter)
            scales = (ctypes.c_float * 1)(1.0)
            code = lc.llama_set_adapters_lora(self._llama.ctx, adapters, 1, scales)
        else:
            code = lc.llama_set_adapters_lora(self._llama.ctx, None, 0, None)
        if code != 0:
            raise LLMError(f"llama.cpp could not set the adapter (code {code}).", code=code)
        self._adapter_on = on

    def _check_soft(self, soft: np.ndarray | None) -> np.ndarray | None:
        if soft is None:
            return None
        arr = np.asarray(soft)
        if arr.ndim != 2 or arr.shape[1] != self.n_embd or arr.shape[0] == 0:
            raise SoftTokenShapeError(tuple(arr.shape), self.n_embd)
        if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
            raise SoftTokenShapeError(tuple(arr.shape), self.n_embd)
        return np.ascontiguousarray(arr, dtype=np.float32) * np.float32(self.embed_scale)

    def _decode_embeddings(
        self,
        rows: np.ndarray,
        want_logits: bool = False,
        token_ids: Sequence[int] = (),
        lead: Sequence[int] = (),
    ) -> None:
        """Decode embedding rows at the positions after the KV cache, in n_batch chunks.
        The first `len(lead)` rows and the last `len(token_ids)` are those tokens' own
        embedding rows (`TokenRows`): the cache holds them as the tokens; the rows between
        them are soft rows."""
        llama = self._llama
        n_past = llama.n_tokens
        llama._ctx.kv_cache_seq_rm(-1, n_past, -1)
        self._decode_rows(rows, n_past, 0, want_logits)
        # Advance llama-cpp-python's bookkeeping over placeholders so eval() keeps them.
        soft_at = n_past + len(lead)
        n_soft = len(rows) - len(lead) - len(token_ids)
        llama.input_ids[n_past:soft_at] = lead
        llama.input_ids[soft_at : soft_at + n_soft] = _PLACEHOLDER_ID
        llama.input_ids[soft_at + n_soft : n_past + len(rows)] = token_ids
        llama.n_tokens = n_past + len(rows)
        if want_logits:
            llama._requires_eval = False  # its next token is sampled from these logits
        for i, row in enumerate(rows[len(lead) : len(lead) + n_soft]):
            self._soft_at[soft_at + i] = _row_key(row)

    def _decode_rows(self, rows: np.ndarray, at: int, seq: int, want_logits: bool) -> None:
        """Decode embedding rows at positions `at`… of sequence `seq`, in n_batch chunks
        (the last row's logits kept if `want_logits`); no bookkeeping."""
        lc = self._lc
        n_batch = self.config.n_batch
        for start in range(0, len(rows), n_batch):
            chunk = np.ascontiguousarray(rows[start : start + n_batch])
            batch = lc.llama_batch_init(len(chunk), self.n_embd, 1)
            try:
                ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
                for i in range(len(chunk)):
                    batch.pos[i] = at + start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = want_logits and start + i == len(rows) - 1
                batch.n_tokens = len(chunk)
                code = lc.llama_decode(self._llama.ctx, batch)
            finally:
                lc.llama_batch_free(batch)
            if code != 0:
                raise LLMError(f"llama_decode failed on soft tokens (code {code}).", code=code)

    def split_prompt(
        self, prompt: str, placement: Placement = "prefix"
    ) -> tuple[list[int], list[int]]:
        """The token ids of a templated `prompt`, split where soft tokens go: (before,
        after). `prefix`: after a leading BOS. `before_answer`: before the answer's header
        (the whole request is `before`); a prompt that does not end with the header (no
        template) keeps its last token after. Training (export side) splits with this too."""
        if placement not in PLACEMENTS:
            raise InvalidInputError(
                f"Unknown soft-token placement {placement!r}; use one of {', '.join(PLACEMENTS)}.",
                field="placement",
            )
        header = self.answer_header
        fits = bool(header) and len(prompt) > len(header) and prompt.endswith(header)
        if placement == "before_answer" and fits:
            return self.tokenize(prompt[: -len(header)]), list(self._header_ids)
        ids = self.tokenize(prompt)
        if placement == "before_answer":
            return ids[:-1], ids[-1:]
        bos = self._llama.token_bos()
        adds_bos = self._llama._model.add_bos_token()
        head = ids[:1] if adds_bos and ids and bos != -1 and ids[0] == bos else []
        return head, ids[len(head) :]

    def _prefill_soft(
        self, before: list[int], after: list[int], soft: np.ndarray | None, tail: int = 1
    ) -> list[int]:
        """Bring the KV cache to [before][soft rows][after minus its last `tail` ids],
        reusing what the previous call left where it matches exactly; return the full token
        list for generate() (which evaluates the last `tail` ids itself, in one batch)."""
        k = 0 if soft is None else len(soft)
        tokens = [*before, *([_PLACEHOLDER_ID] * k), *after]
        tail = min(max(tail, 1), len(after)) if after else 1
        keys: list[int | bytes] = list(tokens)
        for i in range(k):
            keys[len(before) + i] = _row_key(soft[i])  # type: ignore[index]
        self._truncate(self._common_prefix(keys[:-tail]) if self.config.prefix_cache else 0)
        llama = self._llama
        soft_end = len(before) + k
        if llama.n_tokens < soft_end:
            if llama.n_tokens < len(before):
                self._use_adapter(False)  # switched only when needed: llama.cpp re-plans
                llama.eval(before[llama.n_tokens :])
            self._use_adapter(True)
            self._decode_embeddings(soft[llama.n_tokens - len(before) :])  # type: ignore[index]
        # The adapter acts from the soft tokens on: on what follows them and the answer.
        self._use_adapter(soft is not None)
        if self.config.prefix_cache and llama.n_tokens < len(tokens) - tail:
            # Logits depend on the batch a token is evaluated in. Evaluating the last `tail`
            # prompt tokens as one batch, always, makes a repeated prompt's answer
            # bit-identical to the first.
            llama.eval(tokens[llama.n_tokens : -tail])
        return tokens

    def _prefill(
        self, before: list[int], after: list[int], soft: np.ndarray | None, placement: Placement
    ) -> list[int]:
        """Bring the KV cache to the prompt's tokens for generation: all of them when soft
        rows go before the answer's header and the model's token rows can be read (the
        header's rows then travel in the soft rows' batch, and so do the request's uncached
        tokens' where `_one_pass`: one decode pass, its last row's logits the first answer
        token's); else all but the last batch, which `generate` evaluates (the header,
        whole, after soft rows; else the last token)."""
        if soft is None or placement != "before_answer":
            return self._prefill_soft(before, after, soft)
        if not after or self.token_rows is None:
            return self._prefill_soft(before, after, soft, tail=len(after))
        # The soft rows and the header end the last batch always, cached or not: a
        # repeated prompt's answer is bit-identical to the first.
        llama = self._llama
        self._truncate(self._common_prefix(before) if self.config.prefix_cache else 0)
        lead = before[llama.n_tokens :]
        if lead and not self._one_pass:
            self._use_adapter(False)
            llama.eval(lead)
            lead = []
        self._use_adapter(True)
        self._decode_embeddings(self._prompt_rows(lead, soft, after), True, after, lead)
        return [*before, *([_PLACEHOLDER_ID] * len(soft)), *after]

    def _prompt_rows(self, lead: list[int], soft: np.ndarray, after: list[int]) -> np.ndarray:
        """The embedding rows of [lead tokens][soft rows][after tokens], the tokens' read as
        llama.cpp reads and scales them (the soft rows come scaled: `_check_soft`)."""
        scale = np.float32(self.embed_scale)
        table = self.token_rows
        assert table is not None  # callers read the answer's header from it first
        return np.concatenate([table(lead) * scale, soft, table(after) * scale])

    @property
    def _one_pass(self) -> bool:
        """Whether the request's uncached tokens travel in the soft rows' batch too: one
        decode pass for the whole prompt, as a bare prompt takes. Not where an adapter must
        stay off for them, nor where a row's result may depend on the batch it is in (a
        repeat, whose request is cached, would then not be bit-identical to the first)."""
        return self._adapter is None and self._rows_batch_invariant

    @functools.cached_property
    def _rows_batch_invariant(self) -> bool:
        return self.token_rows is not None and self.token_rows.batch_invariant(self._lc)

    def _truncate(self, keep: int) -> None:
        """Keep the KV cache's first `keep` positions (0: empty it) for the next prompt."""
        self.cached_tokens = keep
        llama = self._llama
        if keep == 0:
            llama.reset()  # positions beyond n_tokens are never attended: no need to clear
            self._soft_at = {}
        else:
            llama.n_tokens = keep
            llama._ctx.kv_cache_seq_rm(-1, keep, -1)
            self._soft_at = {p: h for p, h in self._soft_at.items() if p < keep}

    def reset(self) -> None:
        """Empty the KV cache and zero its memory (about 8 ms for SmolLM2 at n_ctx 2048):
        nothing of the previous prompt stays, and the next call computes its whole prompt."""
        self._llama.reset()
        self._llama._ctx.kv_cache_clear()
        self._soft_at = {}

    def _common_prefix(self, keys: Sequence[int | bytes]) -> int:
        """How many leading positions of the KV cache already hold `keys`."""
        llama = self._llama
        n = min(llama.n_tokens, len(keys))
        ids = llama.input_ids
        for p in range(n):
            held = self._soft_at.get(p, int(ids[p]))
            if held != keys[p]:
                return p
        return n

    def next_token_logits(
        self, ids: Sequence[int], soft: np.ndarray | None = None, at: int | None = None
    ) -> np.ndarray:
        """Logits for the token after `ids` with `soft` rows inserted before `ids[at]` (None:
        in front, after a leading BOS, as the `prefix` placement puts them)."""
        ids = list(ids)
        soft = self._check_soft(soft)
        if at is None:
            bos = self._llama.token_bos()
            adds_bos = self._llama._model.add_bos_token()
            at = 1 if soft is not None and adds_bos and ids and ids[0] == bos != -1 else 0
        tokens = self._prefill_soft(ids[:at], ids[at:], soft)
        self._check_fits(len(tokens), 0, 0 if soft is None else len(soft))
        rest = tokens[self._llama.n_tokens :]
        if rest:
            self._llama.eval(rest)
        ptr = self._lc.llama_get_logits_ith(self._llama.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._llama.n_vocab(),)).copy()

    def logits_for_embeddings(self, rows: np.ndarray) -> np.ndarray:
        """Logits after feeding raw input-embedding rows (no scale applied): parity checks."""
        self.reset()
        self._use_adapter(False)
        self._decode_embeddings(np.ascontiguousarray(rows, dtype=np.float32), want_logits=True)
        ptr = self._lc.llama_get_logits_ith(self._llama.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(self._llama.n_vocab(),)).copy()
        self.reset()  # rows decoded without the adapter are not for a later call to reuse
        return logits

    # --- generation ---------------------------------------------------------------------------

    def _check_fits(self, n_prompt: int, max_tokens: int, n_soft: int) -> None:
        """ContextOverflowError if a prompt of `n_prompt` positions (`n_soft` of them soft)
        and `max_tokens` more do not fit the context."""
        if n_prompt + max_tokens > self.n_ctx:
            raise ContextOverflowError(
                prompt_tokens=n_prompt, max_tokens=max_tokens, n_ctx=self.n_ctx, soft_tokens=n_soft
            )

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def prompt_parts(
        self, prompt: str, soft: np.ndarray | None, placement: Placement, max_tokens: int
    ) -> tuple[list[int], list[int]]:
        """`prompt`'s ids before and after where `soft` rows go (all after when there are
        none), checked to fit the context with `max_tokens` more (ContextOverflowError)."""
        if soft is None:
            before, after = [], self.tokenize(prompt)
        else:
            before, after = self.split_prompt(prompt, placement)
        n_soft = 0 if soft is None else len(soft)
        self._check_fits(len(before) + len(after) + n_soft, max_tokens, n_soft)
        return before, after

    def _start(
        self,
        prompt: str,
        soft: np.ndarray | None,
        sampling: SamplingConfig,
        stream: bool,
        placement: Placement,
    ) -> tuple[Any, int, int]:
        soft = self._check_soft(soft)
        before, after = self.prompt_parts(prompt, soft, placement, sampling.max_tokens)
        n_soft = 0 if soft is None else len(soft)
        tokens = self._prefill(before, after, soft, placement)
        result = self._llama.create_completion(
            prompt=tokens,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            repeat_penalty=sampling.repeat_penalty,
            stop=list(sampling.stop) or None,
            stream=stream,
            seed=self.config.seed if sampling.seed is None else sampling.seed,
        )
        return result, len(tokens), n_soft

    def stream(
        self,
        prompt: str,
        soft: np.ndarray | None = None,
        sampling: SamplingConfig | None = None,
        placement: Placement = "prefix",
        on_end: Callable[[Completion], None] | None = None,
    ) -> Iterator[str]:
        """Yield the completion of `prompt` (already templated) piece by piece, with `soft`
        tokens where `placement` says; `on_end` gets the whole `Completion` (its usage and
        finish reason) once the generation has ended, not when the reader stops early."""
        sampling = sampling or SamplingConfig()
        started = time.perf_counter()
        chunks, n_prompt, n_soft = self._start(prompt, soft, sampling, True, placement)
        pieces: list[str] = []
        first_at = None
        finish = "stop"
        for chunk in chunks:
            choice = chunk["choices"][0]
            if first_at is None:
                first_at = time.perf_counter()
            finish = choice.get("finish_reason") or finish
            if choice["text"]:
                pieces.append(choice["text"])
                yield choice["text"]
        ended = time.perf_counter()
        if on_end is None:
            return
        # Every sampled token but the last is evaluated into the cache.
        n_out = max(0, self._llama.n_tokens - n_prompt + 1)
        first_at = first_at or ended
        on_end(
            Completion(
                text="".join(pieces),
                finish_reason=finish,
                prompt_tokens=n_prompt,
                soft_tokens=n_soft,
                completion_tokens=n_out,
                cached_tokens=self.cached_tokens,
                prefill_seconds=first_at - started,
                decode_seconds=ended - first_at,
            )
        )

    def complete(
        self,
        prompt: str,
        soft: np.ndarray | None = None,
        sampling: SamplingConfig | None = None,
        placement: Placement = "prefix",
    ) -> Completion:
        """Complete `prompt` (already templated), with `soft` tokens where `placement` says."""
        done: list[Completion] = []
        for _ in self.stream(prompt, soft, sampling, placement, done.append):
            pass
        return done[0]

    def draw(
        self,
        prompt: str,
        soft: np.ndarray | None,
        samplings: Sequence[SamplingConfig],
        placement: Placement = "prefix",
        ended: Callable[[Sequence[int]], bool] | None = None,
    ) -> list[Completion]:
        """One answer to `prompt` per entry of `samplings`, decoded side by side: the
        prompt's keys and values are computed once (reusing the cache as `stream` does) and
        shared by a sequence per answer, and each step decodes every unfinished answer's
        next token in one llama.cpp batch (as many answers at a time as the batch and the
        cache hold: at most `max_sequences`), one row for the answers whose tokens so far
        are the same (`_alike`). An answer is sampled as `stream` samples it
        alone (the same sampler chain and seed) and ends at an end-of-generation token, at
        one of its stop strings, where `ended(its ids)` says, or at its `max_tokens`. Each
        Completion carries its `ids`; its text is theirs, as `complete` gives it (no
        end-of-generation token, cut before a stop string), except that a character
        `max_tokens` cuts in two ends as U+FFFD (llama-cpp-python generates past
        `max_tokens` to finish it)."""
        return self.draw_each([Ask(prompt, soft, tuple(samplings), placement)], ended)[0]

    def draw_each(
        self, asks: Sequence[Ask], ended: Callable[[Sequence[int]], bool] | None = None
    ) -> list[list[Completion]]:
        """`draw` for each of `asks`, all of their answers side by side in one batch per
        step where they fit one cache together and each prompt after the first has soft
        rows before its answer and goes in one pass (`_one_pass`): such a prompt shares the
        first prompt's keys and values up to where their tokens part, and computes only
        the rest, on a sequence of its own. The answers are the ones `draw` gives each ask
        alone after the one before it (where llama.cpp attends a lone token in one piece);
        the prefill time of answers drawn together is that of all their prompts."""
        parts = []
        for ask in asks:
            if not ask.samplings:
                parts.append(_Part(None, [], [], ask.placement, ()))
                continue
            soft = self._check_soft(ask.soft)
            most = max(s.max_tokens for s in ask.samplings)
            before, after = self.prompt_parts(ask.prompt, soft, ask.placement, most)
            parts.append(_Part(soft, before, after, ask.placement, tuple(ask.samplings)))
        drawn: list[list[Completion]] = [[] for _ in asks]
        live = [i for i, part in enumerate(parts) if part.samplings]
        if len(live) > 1 and self._fit_together([parts[i] for i in live]):
            for i, completions in zip(
                live, self._draw([parts[i] for i in live], ended), strict=True
            ):
                drawn[i] = completions
            return drawn
        for i in live:
            part = parts[i]
            turns = _in_turns(part.samplings, part.n_prompt, self.n_ctx, self.max_sequences)
            for turn in turns:
                drawn[i] += self._draw([replace(part, samplings=tuple(turn))], ended)[0]
        return drawn

    def _fit_together(self, parts: Sequence[_Part]) -> bool:
        """Whether `parts` can be drawn in one go (`draw_each`)."""
        if not self._one_pass or any(
            p.soft is None or p.placement != "before_answer" for p in parts[1:]
        ):
            return False
        held = parts[0].held
        cells = parts[0].n_prompt + sum(p.n_prompt - _shared(p.before, held) for p in parts[1:])
        answers = [s for p in parts for s in p.samplings]
        cells += sum(s.max_tokens - 1 for s in answers)
        return len(answers) <= self.max_sequences and cells <= self.n_ctx

    def _draw(
        self, parts: Sequence[_Part], ended: Callable[[Sequence[int]], bool] | None
    ) -> list[list[Completion]]:
        """The answers of `parts` (the first prompt brought into the cache as `stream`
        does, each other one on a sequence of its own: `_fit_together`), one batch a step."""
        started = time.perf_counter()
        llama, lc = self._llama, self._lc
        first = parts[0]
        tokens = self._prefill(first.before, first.after, first.soft, first.placement)
        llama.eval(tokens[llama.n_tokens :])  # what `generate` would evaluate, as it does
        n_prompts, cached = [len(tokens)], [self.cached_tokens]
        samplings = [s for p in parts for s in p.samplings]
        n = len(samplings)
        prompt_of = [k for k, p in enumerate(parts) for _ in p.samplings]
        memory = lc.llama_get_memory(llama.ctx)
        samplers = [self._sampler(s) for s in samplings]
        ids: list[list[int]] = [[] for _ in samplings]
        finish = ["length"] * n
        row = [-1] * n  # where each answer's next logits are: its prompt's last, then a batch row

        def sampled(seqs: Sequence[int]) -> list[int]:
            """Sample each of `seqs`' next token; those that go on."""
            going = []
            for seq in seqs:
                ids[seq].append(samplers[seq].sample(llama._ctx, row[seq]))
                if self._stops(ids[seq], samplings[seq].stop, ended):
                    finish[seq] = "stop"
                elif len(ids[seq]) < samplings[seq].max_tokens:
                    going.append(seq)
            return going

        # A row may stand for every answer (`_alike`): a token of several sequences, which
        # llama.cpp takes only in one unified KV cache (`_sequences`).
        batch = lc.llama_batch_init(n, 0, n)
        live: list[int] = []
        try:
            head = 0  # the sequence that holds the prompt, its first answer's
            for k, part in enumerate(parts):
                if k:
                    shared = _shared(part.before, first.held)
                    lc.llama_memory_seq_cp(memory, 0, head, 0, shared)
                    rows = self._prompt_rows(part.before[shared:], part.soft, part.after)
                    self._decode_rows(rows, shared, head, True)
                    n_prompts.append(part.n_prompt)
                    cached.append(shared)
                answers = range(head, head + len(part.samplings))
                for seq in answers[1:]:
                    lc.llama_memory_seq_cp(memory, head, seq, -1, -1)
                live += sampled(answers)  # from its prompt's logits, before the next prompt's
                head += len(part.samplings)
            first_at = time.perf_counter()
            while live:
                rows = _alike(live, prompt_of, ids)
                for i, seqs in enumerate(rows):
                    seq = seqs[0]
                    batch.token[i] = ids[seq][-1]
                    batch.pos[i] = n_prompts[prompt_of[seq]] + len(ids[seq]) - 1
                    batch.n_seq_id[i] = len(seqs)
                    for j, each in enumerate(seqs):
                        batch.seq_id[i][j] = each
                        row[each] = i
                    batch.logits[i] = True
                batch.n_tokens = len(rows)
                if (code := lc.llama_decode(llama.ctx, batch)) != 0:
                    raise LLMError(f"llama_decode failed on {len(live)} answers (code {code}).")
                live = sampled(live)
        finally:
            lc.llama_batch_free(batch)
            for sampler in samplers:
                sampler.close()
            for seq in range(1, n):
                lc.llama_memory_seq_rm(memory, seq, -1, -1)
            # The first prompt stays, as after `stream`.
            lc.llama_memory_seq_rm(memory, 0, n_prompts[0], -1)
            llama.n_tokens = n_prompts[0]
        ended_at = time.perf_counter()
        eog = self.eog_ids
        drawn: list[list[Completion]] = [[] for _ in parts]
        for seq, (answer, reason, s) in enumerate(zip(ids, finish, samplings, strict=True)):
            k = prompt_of[seq]
            drawn[k].append(
                Completion(
                    text=cut_at_stop(self.detokenize([t for t in answer if t not in eog]), s.stop),
                    finish_reason=reason,
                    prompt_tokens=n_prompts[k],
                    soft_tokens=0 if parts[k].soft is None else len(parts[k].soft),
                    completion_tokens=len(answer),
                    cached_tokens=cached[k],
                    prefill_seconds=first_at - started,
                    decode_seconds=ended_at - first_at,
                    ids=tuple(answer),
                )
            )
        return drawn

    def _stops(
        self,
        ids: list[int],
        stop: Sequence[str],
        ended: Callable[[Sequence[int]], bool] | None,
    ) -> bool:
        if ids[-1] in self.eog_ids or (ended is not None and ended(ids)):
            return True
        return bool(stop) and any(s in self.detokenize(ids) for s in stop)

    def _sampler(self, sampling: SamplingConfig) -> Any:
        """The sampler chain `create_completion` builds for `sampling` (its defaults for
        what SamplingConfig does not set), seeded as `stream` seeds it."""
        llama = self._llama
        llama.set_seed(self.config.seed if sampling.seed is None else sampling.seed)
        return llama._init_sampler(
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            temp=sampling.temperature,
            repeat_penalty=sampling.repeat_penalty,
        )
