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

Nor do they optimize the same graph again at every start: the first session on a model
writes the graph onnxruntime optimized beside it (`.ort/`, named by the model file's
identity, onnxruntime's version and the machine), and later ones load that copy
with optimization off: the same graph, the same kernels, bit-identical outputs (tested),
and the embedder's session opens in about 20 ms instead of 45. The copy is trusted as the
bundle trusts a file it has hashed: its inode, size, mtime and ctime (which ordinary
programs cannot set back) are stamped beside it when it is written; any change, or any
error, and the model is optimized from its verified file again. A folder that cannot be
written keeps no copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..cpus import library_threads
from ..errors import BundleError
from ..files import atomic_write, private_dir

if TYPE_CHECKING:
    import onnxruntime as ort


def open_session(path: str | Path, threads: int = 0, what: str = "model") -> ort.InferenceSession:
    """An InferenceSession on `path` with `threads` threads (0: `cpus.library_threads`, one
    per physical core this process may use within its bounds, or onnxruntime's own
    default where neither can be told); a file onnxruntime cannot load is a BundleError
    naming it."""
    import onnxruntime as ort  # here: a request that runs no ONNX model never loads it

    def options() -> ort.SessionOptions:
        made = ort.SessionOptions()
        made.intra_op_num_threads = threads or library_threads()
        made.inter_op_num_threads = 1
        made.add_session_config_entry("session.intra_op.allow_spinning", "0")
        made.add_session_config_entry("session.inter_op.allow_spinning", "0")
        made.enable_cpu_mem_arena = False
        made.log_severity_level = 3
        return made

    path = Path(path)
    copy = _OptimizedCopy(path, ort.__version__)
    if (ready := copy.ready()) is not None:
        fast = options()
        fast.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        with contextlib.suppress(Exception):  # onnxruntime's own errors: optimize again
            return ort.InferenceSession(
                str(ready), sess_options=fast, providers=["CPUExecutionProvider"]
            )
    first = options()
    writing = copy.start()
    if writing is not None:
        first.optimized_model_filepath = str(writing)
    try:
        session = ort.InferenceSession(
            str(path), sess_options=first, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors
        copy.abandon()
        raise BundleError(
            f"onnxruntime could not load the {what} {path} ({exc}); rebuild the bundle with "
            "`edge-pllm setup --rebuild` (or re-export it).",
            file=str(path),
        ) from exc
    copy.finish()
    return session


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _this_machine() -> str:
    """The machine a copy was optimized on (onnxruntime warns that an optimized graph may
    hold layouts for its hardware): a home restored on another computer optimizes again."""
    return f"{platform.node()} {platform.machine()}"


class _OptimizedCopy:
    """The optimized graph of one model file, kept beside it (see the module's doc)."""

    def __init__(self, model: Path, ort_version: str):
        self.folder = model.parent / ".ort"
        try:
            source = "-".join(map(str, _identity(model)))
        except OSError:
            source = "missing"
        key = hashlib.sha256(f"{source} {ort_version} {_this_machine()}".encode())
        self.path = self.folder / f"{model.stem}-{key.hexdigest()[:16]}.onnx"
        self.stamp = self.path.with_suffix(".json")
        self._tmp: Path | None = None

    def ready(self) -> Path | None:
        """The copy, if it is there and unchanged since it was stamped."""
        try:
            stamp = json.loads(self.stamp.read_text())
            if stamp["identity"] == _identity(self.path):
                return self.path
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def start(self) -> Path | None:
        """Where onnxruntime should write the copy (None: this folder keeps none)."""
        try:
            private_dir(self.folder)
            fd, name = tempfile.mkstemp(dir=self.folder, prefix=".writing-", suffix=".onnx")
            os.close(fd)
        except OSError:
            return None
        self._tmp = Path(name)
        return self._tmp

    def finish(self) -> None:
        """Stamp the copy written and put it in place; the stale copies of this model go."""
        tmp, self._tmp = self._tmp, None
        if tmp is None:
            return
        try:
            if tmp.stat().st_size == 0:
                raise OSError("onnxruntime wrote no optimized graph")
            os.replace(tmp, self.path)
            atomic_write(self.stamp, json.dumps({"identity": _identity(self.path)}))
            stem = self.path.name.rsplit("-", 1)[0]
            for old in self.folder.glob(f"{stem}-*"):
                if old not in (self.path, self.stamp) and len(old.stem) == len(self.path.stem):
                    old.unlink(missing_ok=True)
        except OSError:
            tmp.unlink(missing_ok=True)

    def abandon(self) -> None:
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system once sessions are let go (glibc's
    `malloc_trim`; elsewhere nothing): what onnxruntime freed (the head's projection of 512
    history items among it) otherwise stays in the process beside the LLM (measured: 27
    MiB of a plug answer's peak)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # musl has none
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: glibc's
