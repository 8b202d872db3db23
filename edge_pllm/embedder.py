"""Sentence embeddings with onnxruntime and `tokenizers`: no torch on the device.

Pooling and normalization follow the sentence-transformers config the model was exported
from (recorded in the bundle manifest). Texts are sorted by length before batching, as
sentence-transformers does, so a batch pads to similar lengths.

The default batch size is 1: a dynamically quantized (int8) model computes one activation
scale per tensor, i.e. per batch, so a text's vector would depend on the texts batched
with it (measured: cosine down to 0.981 between batched and alone). Stored vectors must
not depend on how they were ingested; batch_size > 1 trades that for ~2x throughput.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .errors import BundleError


@dataclass(frozen=True)
class EmbedderConfig:
    """How the exported encoder's token states become one sentence vector."""

    dim: int
    pooling: str = "mean"  # "mean", "cls" or "max"
    normalize: bool = True
    max_seq_length: int = 256
    batch_size: int = 1
    threads: int = 0  # 0: onnxruntime's default


class Embedder:
    """Encode texts into L2-normalized (if configured) float32 vectors."""

    def __init__(self, model_path: str | Path, tokenizer_path: str | Path, config: EmbedderConfig):
        self.config = config
        options = ort.SessionOptions()
        if config.threads:
            options.intra_op_num_threads = config.threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BundleError(
                f"onnxruntime could not load the embedder {model_path} ({exc}); "
                "rebuild the bundle with `edge-pllm setup --rebuild`.",
                file=str(model_path),
            ) from exc
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self._tokenizer.enable_truncation(max_length=config.max_seq_length)
        self._tokenizer.no_padding()

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

        `batch_size` overrides the configured one (see the module note on int8 batching)."""
        batch_size = batch_size or self.config.batch_size
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch(list(texts))
        order = np.argsort([-len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = [encodings[i] for i in idx]
            width = max(len(e.ids) for e in batch)
            ids = np.zeros((len(batch), width), dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            types = np.zeros((len(batch), width), dtype=np.int64)
            for row, enc in enumerate(batch):
                n = len(enc.ids)
                ids[row, :n] = enc.ids
                mask[row, :n] = 1
                types[row, :n] = enc.type_ids
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            hidden = self._session.run(None, {k: v for k, v in feeds.items() if k in self._inputs})[
                0
            ]
            out[idx] = self._pool(hidden, mask)
            if progress is not None:
                progress(len(idx))
        return out

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
