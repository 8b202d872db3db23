"""A model's token-embedding rows, read from its GGUF the way llama.cpp reads them.

A token's input embedding given to llama.cpp as a row of an embedding batch is the token
itself, bit for bit, when the row is what llama.cpp's own lookup produces: the GGUF's
`token_embd.weight` row dequantized by ggml's own routine for its type (`to_float`, as the
CPU backend's row lookup does). That lets the tokens around soft rows travel in the soft
rows' batch (`LLM`: the whole prompt in one decode pass, as a bare prompt takes), where
the model's weights are of a type computed row by row in any batch (`batch_invariant`).

Only the tensor's place in the file is parsed here (the GGUF header); the rows are read
from a memory map on demand, never the whole table. Anything this reader does not know (a
ggml library it cannot find, a layout it does not expect) leaves it out: `TokenRows.open`
returns None and the caller decodes those tokens as tokens.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TENSOR = "token_embd.weight"
_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
# Byte sizes of the GGUF metadata value types with a fixed size (by type id).
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_F32, _F16 = 0, 1
_U64 = struct.Struct("<Q")

_to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    """ggml's `struct ggml_type_traits` (ggml.h)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


def _type_count() -> int:
    """How many tensor types the ggml that llama-cpp-python ships knows."""
    from llama_cpp import llama_cpp as lc

    return int(lc.GGML_TYPE_COUNT)


def _ggml() -> ctypes.CDLL | None:
    """The ggml library llama-cpp-python loaded (the same code that dequantizes its rows)."""
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    names = {"darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
    path = folder / names.get(sys.platform, "libggml-base.so")
    if not path.is_file():
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    return lib


def _tensors(buf: memoryview) -> dict[str, tuple[int, list[int], int]] | None:
    """(ggml type, dims, absolute offset of the data) of every tensor in a GGUF file."""
    if bytes(buf[:4]) != _MAGIC:
        return None
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version < 2:
        return None
    pos = 24
    alignment = 32

    def string(at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, at)
        return bytes(buf[at + 8 : at + 8 + n]).decode("utf-8", "replace"), at + 8 + n

    def skip(kind: int, at: int) -> int:
        if kind in _FIXED:
            return at + _FIXED[kind]
        if kind == _STRING:
            (n,) = struct.unpack_from("<Q", buf, at)
            return at + 8 + n
        if kind == _ARRAY:
            inner, count = struct.unpack_from("<IQ", buf, at)
            at += 12
            if inner in _FIXED:
                return at + count * _FIXED[inner]
            if inner == _STRING:  # a vocabulary: tens of thousands, skipped in a tight loop
                length = _U64.unpack_from
                for _ in range(count):
                    at += 8 + length(buf, at)[0]
                return at
            for _ in range(count):
                at = skip(inner, at)
            return at
        raise ValueError(f"unknown GGUF value type {kind}")

    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if key == "general.alignment" and kind == 4:
            (alignment,) = struct.unpack_from("<I", buf, pos)
        pos = skip(kind, pos)
    found = {}
    for _ in range(n_tensors):
        tensor, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = list(struct.unpack_from(f"<{n_dims}Q", buf, pos + 4))
        kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        found[tensor] = (kind, dims, offset)
    start = (pos + alignment - 1) // alignment * alignment
    return {name: (kind, dims, start + offset) for name, (kind, dims, offset) in found.items()}


# ggml types whose matrix products llama.cpp's CPU backend computes for each row alone,
# whatever else its batch holds: Q4_1 and Q5_1, which ggml neither repacks into interleaved
# layouts (ggml-cpu/repack.cpp repacks Q4_0, Q8_0, IQ4_NL, MXFP4 and most K-quants, with
# kernels that differ by CPU) nor hands to llamafile's sgemm (it takes batches of two rows
# or more of F32, F16, BF16, Q8_0, Q4_0, Q5_0 and IQ4_NL, and leaves a lone row to ggml's
# own dot product). Measured bit-identical with the prompt's last batch 1, 3, 5, 6, 8 or
# all rows long; Q4_1, the default model's type, in tests/test_llm.py.
_ROW_EXACT = frozenset({3, 7})
# Read row by row for themselves (TokenRows) or only at the rows that want logits (in a
# prompt, its last row alone, whatever batch it is in).
_LOOKUP = frozenset({TENSOR, "output.weight"})
# Builds whose kernels would take such weights otherwise: AMX and KleidiAI, and ARM's int8
# matrix multiply, which computes two rows of Q4_1 together where the batch's size is even.
_OTHER_KERNELS = ("AMX_INT8 = 1", "KLEIDIAI = 1", "MATMUL_INT8 = 1")


def batch_invariant(path: str | Path, llama_cpp: Any) -> bool:
    """Whether every weight matrix of the GGUF at `path` is of a type whose rows llama.cpp
    (the loaded `llama_cpp` module's build) computes alike in any batch (False where its
    table cannot be read: `TokenRows.open`)."""
    rows = TokenRows.open(path)
    return rows is not None and rows.batch_invariant(llama_cpp)


class TokenRows:
    """The rows of a GGUF's token-embedding table, as llama.cpp looks them up."""

    def __init__(
        self,
        data: np.ndarray,
        kind: int,
        n_embd: int,
        to_float,
        row_bytes: int,
        weights: frozenset[int] = frozenset(),
    ):
        self._data = data  # the table's bytes, n_vocab × row_bytes, memory-mapped
        self._kind = kind
        self.n_embd = n_embd
        self._to_float = to_float
        self._row_bytes = row_bytes
        self._weights = weights  # the ggml types of the file's weight matrices

    def batch_invariant(self, llama_cpp: Any) -> bool:
        """Whether every weight matrix of the file is of a type whose rows llama.cpp (the
        loaded `llama_cpp` module's build) computes alike in any batch."""
        system = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
        if any(kernel in system for kernel in _OTHER_KERNELS):
            return False
        return bool(self._weights) and self._weights <= _ROW_EXACT

    @classmethod
    def open(cls, path: str | Path) -> TokenRows | None:
        """The table of the GGUF at `path`, or None where it cannot be read exactly."""
        try:
            lib = _ggml()
            mapped = np.memmap(path, dtype=np.uint8, mode="r")
            tensors = _tensors(memoryview(mapped)) or {}
            if lib is None or TENSOR not in tensors:
                return None
            kind, dims, offset = tensors[TENSOR]
            weights = frozenset(
                t
                for name, (t, shape, _) in tensors.items()
                if name not in _LOOKUP and sum(d > 1 for d in shape) > 1
            )
            n_embd, n_vocab = dims[0], dims[1] if len(dims) > 1 else 1
            if not 0 <= kind < _type_count():
                return None  # a type this ggml does not know: its tables end before it
            traits = lib.ggml_get_type_traits(kind).contents
            if traits.type_size != lib.ggml_type_size(kind) or (
                traits.blck_size != lib.ggml_blck_size(kind)
            ):
                return None  # a ggml whose traits are laid out otherwise
            if n_embd % traits.blck_size:
                return None  # rows that are not whole blocks (llama.cpp loads none)
            row_bytes = lib.ggml_row_size(kind, n_embd)
            if offset + n_vocab * row_bytes > mapped.size:
                return None
            if kind == _F32:
                to_float = None
            elif traits.to_float:
                to_float = _to_float_t(traits.to_float)
            else:
                return None
            data = mapped[offset : offset + n_vocab * row_bytes].reshape(n_vocab, row_bytes)
        except (OSError, ValueError, struct.error, AttributeError):
            return None
        return cls(data, kind, n_embd, to_float, row_bytes, weights)

    def __call__(self, ids: Sequence[int]) -> np.ndarray:
        """The float32 rows of `ids` (len(ids) × n_embd)."""
        rows = self._data[np.asarray(ids, dtype=np.intp)]  # a contiguous copy, row after row
        if self._to_float is None:
            return rows.view(np.float32).reshape(len(ids), self.n_embd)
        out = np.empty((len(ids), self.n_embd), dtype=np.float32)
        if len(ids):  # the rows are whole blocks one after another: one call for them all
            self._to_float(rows.ctypes.data, out.ctypes.data, len(ids) * self.n_embd)
        return out
