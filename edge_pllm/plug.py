"""Persona-Plug on the device: the exported head (ONNX) turns the user's stored history
vectors and the request's embedding into soft tokens for llama.cpp.

The head is checked against the bundle: its manifest entry names the sha256 of the LLM and
embedder it was trained for, and a head trained for other models is refused.

A user with no history gets no soft tokens: `plug` then answers with the plain prompt (and
`plug+rag` with neither retrieved items nor soft tokens), and the Personalization says so in
`info["fallback"]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from .errors import BundleError

if TYPE_CHECKING:
    from .bundle import Bundle
    from .strategies import Personalization, Request

HEAD_FILE = "plug.onnx"
N_SOFT = 2  # [instruction; persona]


class PlugHead:
    """The exported PPlug head, run with onnxruntime."""

    def __init__(self, bundle: Bundle):
        spec: dict[str, Any] | None = bundle.manifest.get("plug")
        if not spec:
            raise BundleError(
                f"The bundle {bundle.path} has no Persona-Plug head; train one with "
                "`edge-pllm train-plug` or use a strategy without `plug`.",
                bundle=str(bundle.path),
            )
        files = bundle.manifest["files"]
        for role, name in (("llm", bundle.llm.file), ("embedder", bundle.embedder.file)):
            if spec.get(f"{role}_sha256") != files[name]["sha256"]:
                raise BundleError(
                    f"The Persona-Plug head in {bundle.path} was trained for another {role} "
                    f"(sha256 {str(spec.get(f'{role}_sha256'))[:12]}…, the bundle's {name} is "
                    f"{files[name]['sha256'][:12]}…); retrain the head for this bundle.",
                    bundle=str(bundle.path),
                    file=spec.get("file", HEAD_FILE),
                )
        if (
            spec.get("d_llm") != bundle.llm.n_embd
            or spec.get("d_enc") != bundle.embedder.config.dim
        ):
            raise BundleError(
                f"The Persona-Plug head in {bundle.path} maps {spec.get('d_enc')}→"
                f"{spec.get('d_llm')} but the bundle needs {bundle.embedder.config.dim}→"
                f"{bundle.llm.n_embd}.",
                bundle=str(bundle.path),
            )
        self.max_history = int(spec.get("max_history", 512))
        self.n_soft = int(spec.get("n_soft", N_SOFT))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        path = bundle.file(spec.get("file", HEAD_FILE))
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BundleError(
                f"onnxruntime could not load {path} ({exc}).", file=str(path)
            ) from exc

    def soft_tokens(self, query: np.ndarray, history: np.ndarray) -> np.ndarray:
        """(d_enc,) request embedding and (N, d_enc) history, N ≥ 1 -> (n_soft, d_llm)."""
        history = np.ascontiguousarray(history[-self.max_history :], dtype=np.float32)
        feeds = {
            "query": np.asarray(query, dtype=np.float32).reshape(1, -1),
            "history": history[None],
            "mask": np.ones((1, len(history)), dtype=np.float32),
        }
        return self._session.run(None, feeds)[0][0]


@dataclass(frozen=True)
class Plug:
    """PPlug: the user's whole history as soft tokens; with `rag` > 0, also the k nearest
    history items in the prompt (plug+rag)."""

    rag: int = 0
    name: str = "plug"

    def personalize(self, request: Request) -> Personalization:
        from .strategies import Personalization, require_user

        require_user(request)
        if request.plug is None:
            raise BundleError("This bundle has no Persona-Plug head; use none, recent or rag.")
        query_vec = request.embedder.embed_one(request.query)
        ids, history = request.store.vectors(request.user, limit=request.plug.max_history)
        if not ids:
            return Personalization(info={"fallback": "no history: plain prompt"})
        found = Personalization(
            soft_tokens=request.plug.soft_tokens(query_vec, history),
            info={"history_items": len(ids)},
        )
        if self.rag:
            hits = request.store.search(request.user, query_vec, self.rag)
            found.context = [h.item for h in hits]
            found.info["item_ids"] = [h.item.id for h in hits]
        return found
