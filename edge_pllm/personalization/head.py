"""The Persona-Plug head on the device: the exported ONNX graphs that turn the user's
stored history vectors and the request into soft tokens for llama.cpp. (The `plug`
strategies that use it are in `strategies.py`.)

The head comes in two variants (its spec's `input_encoder` says which):

- `linear` (cheap): the head reads the request's embedding, computed by the bundle's
  frozen embedder, and maps it with a learned linear map.
- `trainable` (the paper): the head holds its own fine-tuned copy of the sentence encoder
  and reads the request's token ids, made with the bundle embedder's tokenizer.

The head's settings come from the bundle's `PlugSpec`, which `load_bundle` has checked
against the bundle (the LLM, embedder and, for `trainable`, tokenizer it was trained for);
a head trained for other models is refused with the reason `Bundle.plug_error` holds.

The head runs as two graphs: `project` computes Proj(h_i) for each history item, which
does not depend on the request and is computed once per change of the user's history;
`aggregate` weighs those projections by the request and makes the soft tokens.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BundleError
from ..inference.bundle import InputEncoder, Placement
from ..inference.onnx_session import open_session
from ..inference.wordpiece import load_tokenizer, pad

if TYPE_CHECKING:
    import onnxruntime as ort

    from ..inference.bundle import Bundle

PROJECTION_CACHE = 16  # histories whose projections stay in memory

# The head's ONNX inputs for each input encoder: the request's part, then the history's.
HISTORY_INPUTS = ("history", "mask")
PROJECTED_INPUT = "projected"  # the aggregate graph's Proj(h_i), from the project graph
QUERY_INPUTS: dict[InputEncoder, tuple[str, ...]] = {
    "linear": ("query",),
    "trainable": ("input_ids", "attention_mask"),
}


class QueryTokenizer:
    """The request's token ids as the trainable input encoder reads them: the bundle
    embedder's tokenizer, truncated to the embedder's max length. Training (export side)
    and the device use this same class, so both feed the head identical ids."""

    def __init__(self, tokenizer_path: str | Path, max_length: int):
        self._tokenize = load_tokenizer(tokenizer_path, max_length)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """`texts` -> (input_ids, attention_mask), both (len(texts), longest) int64,
        right-padded with id 0 and mask 0."""
        return pad(self._tokenize(texts))


class PlugHead:
    """The exported PPlug head, run with onnxruntime."""

    def __init__(self, bundle: Bundle):
        """Open the head of `bundle`; BundleError if it has none it can use (see
        `Bundle.require_plug`) or its graphs do not take the inputs its spec declares."""
        spec = bundle.require_plug()
        self.spec = spec
        self.input_encoder: InputEncoder = spec.input_encoder
        self.placement: Placement = spec.placement
        self.max_history = spec.max_history
        self.n_soft = spec.n_soft
        path = bundle.file(spec.file)
        self._session = _open(path)
        # Heads attached before the split run as one graph that projects every request.
        self._project: ort.InferenceSession | None = None
        self._projections: OrderedDict[int, tuple[weakref.ref, np.ndarray]] = OrderedDict()
        expected = [*QUERY_INPUTS[self.input_encoder], *HISTORY_INPUTS]
        if spec.project_file:
            self._project = _open(bundle.file(spec.project_file))
            expected.append(PROJECTED_INPUT)
        found = [i.name for i in self._session.get_inputs()]
        if sorted(found) != sorted(expected):
            raise BundleError(
                f"The Persona-Plug head {path} takes inputs {found}, but its manifest "
                f"declares the {self.input_encoder!r} input encoder ({expected}); re-export it.",
                file=str(path),
            )
        self.population: np.ndarray | None = None
        if spec.population_file:
            self.population = _population(bundle.file(spec.population_file), spec.d_enc)
        self._tokenizer: QueryTokenizer | None = None
        if self.input_encoder == "trainable":
            max_length = spec.max_seq_length or bundle.embedder.config.max_seq_length
            self._tokenizer = QueryTokenizer(bundle.file(bundle.embedder.tokenizer), max_length)

    @property
    def reads_text(self) -> bool:
        """True if the head encodes the request's text itself (the `trainable` variant);
        False if it takes the request's embedding from the bundle's embedder (`linear`)."""
        return self._tokenizer is not None

    def soft_tokens(self, query: str | np.ndarray, history: np.ndarray) -> np.ndarray:
        """The request and the user's (N, d_enc) history vectors, N ≥ 1 -> (n_soft, d_llm).

        `query` is the request's text for a head that `reads_text`, else its (d_enc,)
        embedding from the bundle's embedder."""
        if self._tokenizer is not None:
            if not isinstance(query, str):
                raise TypeError("This Persona-Plug head reads the request's text, not a vector.")
            ids, mask = self._tokenizer([query])
            feeds = {"input_ids": ids, "attention_mask": mask}
        else:
            if isinstance(query, str):
                raise TypeError("This Persona-Plug head reads the request's embedding, not text.")
            feeds = {"query": np.asarray(query, dtype=np.float32).reshape(1, -1)}
        if self._project is not None:
            feeds[PROJECTED_INPUT] = self.projected(history)[None]
        history = np.ascontiguousarray(history[-self.max_history :], dtype=np.float32)
        feeds["history"] = history[None]
        feeds["mask"] = np.ones((1, len(history)), dtype=np.float32)
        return self._session.run(None, feeds)[0][0]

    def projected(self, history: np.ndarray) -> np.ndarray:
        """Proj(h_i) of the newest `max_history` rows of `history`. Remembered for the same
        array object while it lives: the store hands out one read-only matrix per user until
        a write, so a user's projections are computed once per change of their history."""
        key = id(history)
        cached = self._projections.get(key)
        if cached is not None and cached[0]() is history:
            self._projections.move_to_end(key)
            return cached[1]
        rows = np.ascontiguousarray(history[-self.max_history :], dtype=np.float32)
        out = self._project.run(None, {"history": rows[None]})[0][0]  # type: ignore[union-attr]
        if not history.flags.writeable:  # a mutable array may change under the same id
            self._projections[key] = (weakref.ref(history), out)
            if len(self._projections) > PROJECTION_CACHE:
                self._projections.popitem(last=False)
        return out


def _population(path: Path, d_enc: int) -> np.ndarray:
    """The head's population history: a read-only (k, d_enc) finite float32 matrix (read-only,
    so its projections are computed once, see `PlugHead.projected`)."""
    try:
        rows = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BundleError(
            f"The population file {path} cannot be read ({exc}).", file=str(path)
        ) from None
    shape_ok = rows.dtype.kind == "f" and rows.ndim == 2 and len(rows) and rows.shape[1] == d_enc
    if not shape_ok or not np.isfinite(rows).all():
        raise BundleError(
            f"The population file {path} must hold a (k, {d_enc}) finite matrix; it holds "
            f"{rows.dtype} {rows.shape}. Re-attach the head.",
            file=str(path),
        )
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    rows.setflags(write=False)
    return rows


def _open(path: Path) -> ort.InferenceSession:
    return open_session(path, what="Persona-Plug graph")
