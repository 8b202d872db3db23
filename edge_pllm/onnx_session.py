"""onnxruntime sessions as the device runs them: CPU, quiet, and without spinning threads.

onnxruntime's worker threads spin for a while after each run by default. Right after a
request is embedded, llama.cpp starts its prefill on the same cores, and spinning threads
slow that prefill by tens of milliseconds or more on a 2-core machine; they are told not to.

Nor do they keep an arena: onnxruntime's CPU arena holds on to the largest activations a
session has ever needed (the embedder's at 256 tokens, the head's projection of 512 history
items), memory that the rest of the request (sqlite-vec's KNN, llama.cpp's prefill) could
reuse. Without it, freed activations go back to the allocator: measured, a generate
process's peak RSS drops by about 26 MiB, with the embedder's and the head's run times
unchanged (paired medians within 1.5%).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .cpus import library_threads
from .errors import BundleError

if TYPE_CHECKING:
    import onnxruntime as ort


def open_session(path: str | Path, threads: int = 0, what: str = "model") -> ort.InferenceSession:
    """An InferenceSession on `path` with `threads` threads (0: `cpus.library_threads`, one
    per physical core this process may use within its bounds, or onnxruntime's own
    default where neither can be told); a file onnxruntime cannot load is a BundleError
    naming it."""
    import onnxruntime as ort  # here: a request that runs no ONNX model never loads it

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or library_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise BundleError(
            f"onnxruntime could not load the {what} {path} ({exc}); rebuild the bundle with "
            "`edge-pllm setup --rebuild` (or re-export it).",
            file=str(path),
        ) from exc


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system once sessions are let go (glibc's
    `malloc_trim`; elsewhere nothing): what onnxruntime freed (the head's projection of 512
    history items among it) otherwise stays in the process beside the LLM (measured: 27
    MiB of a plug answer's peak)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # musl has none
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: glibc's
