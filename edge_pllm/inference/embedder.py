"""Sentence embeddings with onnxruntime and our own WordPiece (`wordpiece`): no torch, no
`tokenizers` on the device.

Pooling and normalization follow the sentence-transformers config the model was exported
from (recorded in the bundle manifest). Texts are sorted by length before batching, as
sentence-transformers does, so a batch pads to similar lengths.

Stored vectors must not depend on how they were ingested, so a model batches only when
its manifest says it is batch-invariant. A dynamically quantized (int8) model, the shipped
one, computes one activation scale per tensor, i.e. per batch, so a text's vector would
depend on the texts batched with it (measured: cosine down to 0.981 between batched and
alone): it embeds one text per run (batch size 1). A `per-row` model (`export embedder
--quantization per-row`) scales each token on its own and gives the same vector, bit for
bit, alone or in any batch (tests/test_embedder.py checks); it batches up to `batch_size`
texts of similar length per run (the manifest's), and at most BATCH_TOKENS padded tokens:
batching saves per-run overhead, which short texts feel, while long texts gain nothing.

Throughput comes from running batches side by side: many batches go to a pool of workers,
one per core, sharing a second session that runs each batch on a single thread. A text's
vector is the same on one thread or several (tests/test_embedder.py checks).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..cpus import usable_cpus
from ..errors import BundleError
from .onnx_session import open_session
from .wordpiece import load_tokenizer, pad

if TYPE_CHECKING:
    import onnxruntime as ort

SHORT_TOKENS = 64  # a lone run of up to this many tokens runs on one thread
BATCH_TOKENS = 256  # padded tokens per run beyond which batching gains nothing
POOLINGS = ("mean", "cls", "max")
PROBE_TEXT = "width probe"  # embedded once on load when the model does not declare its width


@dataclass(frozen=True)
class EmbedderConfig:
    """How the exported encoder's token states become one sentence vector."""

    dim: int
    pooling: str = "mean"  # "mean", "cls" or "max"
    normalize: bool = True
    max_seq_length: int = 256
    batch_size: int = 1  # texts per run; > 1 only for a batch-invariant model
    threads: int = 0  # 0: onnx_session.open_session's choice (cpus.library_threads)
    batch_invariant: bool = False  # a text's vector does not depend on its batch-mates


class Embedder:
    """Encode texts into L2-normalized (if configured) float32 vectors."""

    def __init__(self, model_path: str | Path, tokenizer_path: str | Path, config: EmbedderConfig):
        self.config = config
        self._model_path = str(model_path)
        self._session = self._open(config.threads)
        self._single_thread: ort.InferenceSession | None = None  # for the worker pool
        self._pool_lock = threading.Lock()
        self.workers = config.threads or usable_cpus()
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._tokenize = load_tokenizer(tokenizer_path, config.max_seq_length)
        self._check_width()

    def _check_width(self) -> None:
        """Refuse a model whose vectors are not `config.dim` wide, before anything is stored
        with them (a store records its width when it is made). The width is the last
        dimension of the model's declared output shape, or, when the model declares none,
        that of one short text's vector."""
        if "input_ids" not in self._inputs:
            raise BundleError(
                f"The embedder {self._model_path} takes no input_ids (its inputs: "
                f"{', '.join(sorted(self._inputs))}); rebuild the bundle.",
                file=self._model_path,
            )
        shape = self._session.get_outputs()[0].shape
        width = shape[-1] if isinstance(shape, list) and len(shape) == 3 else None
        if not (isinstance(width, int) and width > 0):  # dynamic: ask the model itself
            encoding = self._tokenize([PROBE_TEXT])[0]
            try:
                width = int(self._run(self._session, [encoding]).shape[-1])
            except Exception as exc:  # onnxruntime raises its own untyped errors
                raise BundleError(
                    f"The embedder {self._model_path} could not embed a test text ({exc}); "
                    "rebuild the bundle.",
                    file=self._model_path,
                ) from exc
        if width != self.config.dim:
            raise BundleError(
                f"The embedder {self._model_path} makes {width}-dim vectors, but the bundle's "
                f"manifest says dim {self.config.dim}; fix the manifest or rebuild the bundle.",
                file=self._model_path,
            )

    def _open(self, threads: int) -> ort.InferenceSession:
        return open_session(self._model_path, threads, "embedder")

    @property
    def dim(self) -> int:
        return self.config.dim

    def embed(
        self,
        texts: Sequence[str],
        progress: Callable[[int], None] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Embed `texts`; returns an array of shape (len(texts), dim), float32.

        `batch_size` overrides the configured one (see the module note on batching: with a
        model that is not batch-invariant, > 1 makes vectors depend on their batch-mates)."""
        batch_size = batch_size or self.config.batch_size
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenize(texts)
        lengths = [len(ids) for ids in encodings]
        batches = _batches(np.argsort([-n for n in lengths], kind="stable"), lengths, batch_size)
        parallel = len(batches) > 1 and self.workers > 1
        # One thread beats waking a pool for a short text (measured: 2.9 vs 3.9 ms at 16
        # tokens; a long one is faster on all cores, 25 vs 31 ms at 238), but the one-thread
        # session is a second copy of the model (+25 MiB peak RSS in a generate process):
        # a short text uses it only once ingest has opened it.
        short = len(batches) == 1 and sum(lengths) <= SHORT_TOKENS
        opened = self._single_thread is not None
        session = self._worker_session() if parallel or (short and opened) else self._session

        def run(idx: np.ndarray) -> np.ndarray:
            return self._run(session, [encodings[i] for i in idx])

        # onnxruntime releases the GIL, so single-threaded runs go side by side.
        with ThreadPoolExecutor(self.workers) if parallel else nullcontext() as pool:
            results = pool.map(run, batches) if parallel else map(run, batches)
            for idx, pooled in zip(batches, results, strict=True):
                out[idx] = pooled
                if progress is not None:
                    progress(len(idx))
        return out

    def _worker_session(self) -> ort.InferenceSession:
        with self._pool_lock:
            if self._single_thread is None:
                self._single_thread = self._open(1)
            return self._single_thread

    def _run(self, session: ort.InferenceSession, batch: list[list[int]]) -> np.ndarray:
        """Pooled vectors of one batch of token ids (one sequence each: token types 0)."""
        ids, mask = pad(batch)
        types = np.zeros_like(ids)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        hidden = session.run(None, {k: v for k, v in feeds.items() if k in self._inputs})[0]
        return self._pool(hidden, mask)

    def count_tokens(self, text: str) -> int:
        """The tokens the model sees for `text` (with its markers, after truncation)."""
        return len(self._tokenize([text])[0])

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    def _pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        m = mask[..., None].astype(np.float32)
        if self.config.pooling == "mean":
            pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
        elif self.config.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.config.pooling == "max":
            pooled = np.where(m > 0, hidden, -np.inf).max(axis=1)
        else:
            raise BundleError(f"Unknown pooling mode {self.config.pooling!r} in the bundle.")
        if self.config.normalize:
            pooled = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return pooled.astype(np.float32)


def _batches(order: np.ndarray, lengths: list[int], batch_size: int) -> list[np.ndarray]:
    """`order` (longest first) cut into runs of at most `batch_size` texts and, past the
    first text, at most BATCH_TOKENS padded tokens: batching saves per-run overhead, which
    only short texts feel; a run of long texts gains nothing and spills the cache (measured:
    16 commit bodies of ~110 tokens a run were 25% slower than one a run)."""
    batches, start = [], 0
    while start < len(order):
        width, end = lengths[order[start]], start + 1
        while (
            end < len(order)
            and end - start < batch_size
            and (end - start + 1) * width <= BATCH_TOKENS
        ):
            end += 1
        batches.append(order[start:end])
        start = end
    return batches
