"""Exact cosine search over a user's vectors held in memory, and the store's bounded cache of
the matrices it reads (docs/SECURITY.md, "The search cache").

Every matrix lives in an anonymous memory map of its own rather than on the heap: when its
last reference goes the map is unmapped and its pages go back to the operating system, so a
dropped matrix never lingers in freed memory. A user's matrices are overwritten with zeros
at once when their items are erased.
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from collections.abc import Hashable, Iterable

import numpy as np

from ..ram import usable_ram

CACHE_FLOOR = 256 * 2**20  # the least budget: 100,000 vectors of 384 floats fit
CACHE_SHARE = 4  # the default budget is a quarter of the memory the process may use
CACHE_ENTRIES = 64
KNN = "knn"  # the kind of a user's whole, unit-normalized matrix (search); else a vectors() limit
_RESCORE_BLOCK = 4096


def default_cache_budget() -> int:
    """The bytes of matrices one store keeps by default: a quarter of the memory this
    process may use (`ram.usable_ram`), at least CACHE_FLOOR. A million vectors of 384
    floats (1.5 GB) fit on a machine with 8 GB; where they do not, sqlite-vec searches."""
    ram = usable_ram()
    return CACHE_FLOOR if ram is None else max(CACHE_FLOOR, ram // CACHE_SHARE)


# Where the system has it, the pages are made at once: one call instead of a fault each.
_MAP = (
    {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE}
    if hasattr(mmap, "MAP_POPULATE")
    else {}
)


def private_matrix(n: int, dim: int) -> np.ndarray:
    """An (n, dim) float32 matrix of zeros in a memory map of its own."""
    buffer = mmap.mmap(-1, max(4 * n * dim, 1), **_MAP)
    return np.frombuffer(buffer, dtype=np.float32, count=n * dim).reshape(n, dim)


class Vectors:
    """Item ids and their vectors, a row each, in buffers that grow and can be wiped.

    `shared` marks a matrix handed out to callers (`HistoryStore.vectors`): dropping it from
    the cache leaves it to them (its map goes when they let go) unless its items are erased."""

    def __init__(self, capacity: int, dim: int, *, shared: bool = False):
        self._ids = np.zeros(capacity, dtype=np.int64)
        self._rows = private_matrix(capacity, dim)
        self.n = 0
        self.shared = shared
        self._frozen: np.ndarray | None = None

    @staticmethod
    def size(n: int, dim: int) -> int:
        """The bytes that `n` vectors of width `dim` take."""
        return n * (8 + 4 * dim)

    @property
    def dim(self) -> int:
        return self._rows.shape[1]

    @property
    def capacity(self) -> int:
        return len(self._ids)

    @property
    def nbytes(self) -> int:
        return self._ids.nbytes + self._rows.nbytes

    @property
    def ids(self) -> np.ndarray:
        return self._ids[: self.n]

    @property
    def rows(self) -> np.ndarray:
        return self._rows[: self.n]

    def frozen(self) -> np.ndarray:
        """The rows, read-only: the same array object for as long as nothing is appended (a
        Persona-Plug head remembers its projections by the array's identity)."""
        if self._frozen is None:
            self._frozen = self.rows.view()
            self._frozen.flags.writeable = False
        return self._frozen

    def append(self, ids: np.ndarray, rows: np.ndarray, where: np.ndarray | None = None) -> None:
        """Append `rows` and their `ids` (only those where `where` is true, if given)."""
        if where is not None and where.all():
            where = None
        start = self.n
        need = start + (len(ids) if where is None else int(np.count_nonzero(where)))
        self._reserve(need)
        if where is None:
            self._ids[start:need] = ids
            self._rows[start:need] = rows
        else:
            np.compress(where, ids, out=self._ids[start:need])
            np.compress(where, rows, axis=0, out=self._rows[start:need])
        self.n = need

    def append_bytes(self, rows: Iterable[tuple[int, bytes]]) -> None:
        """Append rows given as (id, float32 bytes), as SQLite returns them."""
        for item_id, blob in rows:
            self._reserve(self.n + 1)
            self._ids[self.n] = item_id
            self._rows[self.n] = np.frombuffer(blob, np.float32)
            self.n += 1

    def _reserve(self, need: int) -> None:
        self._frozen = None
        if need <= self.capacity:
            return
        start = self.n
        capacity = max(need, start + start // 4 + 64)  # a chat turn a time: grow by a quarter
        ids, rows = np.zeros(capacity, dtype=np.int64), private_matrix(capacity, self.dim)
        ids[:start], rows[:start] = self.ids, self.rows
        self.wipe()
        self._ids, self._rows, self.n = ids, rows, start

    def wipe(self) -> None:
        """Overwrite the ids and vectors with zeros (a caller's read-only view sees zeros)."""
        self._ids.fill(0)
        self._rows.fill(0)
        self.n = 0


def normalize(rows: np.ndarray) -> np.ndarray:
    """Scale each row to unit length in place (a row of zeros stays zeros); returns `rows`."""
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    np.divide(rows, norms[:, None], out=rows, where=norms[:, None] > 0)
    return rows


def top_k(matrix: Vectors, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The `k` rows of `matrix` (unit rows) nearest to the unit vector `query` by cosine
    distance, as (id, distance), nearest first; rows at the same distance in id order.
    A query of zeros is at distance 1 from every row."""
    n = matrix.n
    if n == 0 or k < 1:
        return []
    ids = matrix.ids
    if not query.any():
        return [(int(i), 1.0) for i in np.sort(ids)[:k]]
    rows = matrix.rows
    if k < n:
        scores = rows @ query
        # float32 BLAS gets a dot product of unit vectors within dim * 2**-24 of its value,
        # and not always the same for equal rows: each row that may be in the top k is
        # rescored (the margin is twice what two such errors add up to).
        kth = np.partition(scores, n - k)[n - k]
        picked = np.flatnonzero(scores >= kth - rows.shape[1] * 2.0**-22)
    else:
        picked = np.arange(n)
    exact = np.empty(len(picked))
    for start in range(0, len(picked), _RESCORE_BLOCK):
        block = rows[picked[start : start + _RESCORE_BLOCK]]
        # In float64 every product of two float32 is exact, and each row sums the same way.
        exact[start : start + len(block)] = np.einsum("ij,j->i", block, query, dtype=np.float64)
        block.fill(0)
    order = np.lexsort((ids[picked], -exact))[:k]
    return [(int(ids[picked[i]]), float(1.0 - exact[i])) for i in order]


class SearchCache:
    """One store's matrices in memory, by user: `vectors()` rows (key `(uid, limit)`) and
    the whole unit-normalized matrix that search scans (key `(uid, KNN)`). At most `budget`
    bytes, least recently used out first; valid while the database's `token` holds."""

    def __init__(self, budget: int, entries: int = CACHE_ENTRIES):
        self._entries: OrderedDict[tuple[int, Hashable], Vectors] = OrderedDict()
        self._budget = int(budget)
        self._max_entries = entries
        self.token: Hashable = None

    @property
    def budget(self) -> int:
        return self._budget

    @budget.setter
    def budget(self, value: int) -> None:
        self._budget = max(0, int(value))
        while self._entries and self.used > self._budget:
            self._drop(next(iter(self._entries)))

    @property
    def used(self) -> int:
        """The bytes held now."""
        return sum(e.nbytes for e in self._entries.values())

    def used_by(self, uid: int) -> int:
        return sum(e.nbytes for key, e in self._entries.items() if key[0] == uid)

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self._budget

    def sync(self, token: Hashable) -> None:
        """Drop everything if the database changed since `token` was last seen."""
        if token != self.token:
            self.clear()
            self.token = token

    def get(self, uid: int, kind: Hashable) -> Vectors | None:
        entry = self._entries.get((uid, kind))
        if entry is not None:
            self._entries.move_to_end((uid, kind))
        return entry

    def keep(self, uid: int, kind: Hashable, entry: Vectors) -> bool:
        """Keep `entry`, dropping the least recently used others to make room; False (and
        not kept) if it is larger than the whole budget."""
        if not self.fits(entry.nbytes):
            return False
        self._drop((uid, kind))
        self._fit(entry.nbytes)
        self._entries[(uid, kind)] = entry
        return True

    def added(self, uid: int, ids: np.ndarray, unit_rows: np.ndarray) -> None:
        """The user got new items: their search matrix grows, their `vectors()` rows (in
        time order, limited) are dropped."""
        for key in [key for key in self._entries if key[0] == uid and key[1] != KNN]:
            self._drop(key)
        matrix = self._entries.get((uid, KNN))
        if matrix is None:
            return
        del self._entries[(uid, KNN)]  # the others make room for what it grows by
        matrix.append(ids, unit_rows)
        if not self.fits(matrix.nbytes):  # searched in the file from now on
            matrix.wipe()
            return
        self._fit(matrix.nbytes)
        self._entries[(uid, KNN)] = matrix

    def erase(self, uid: int) -> None:
        """The user's items are being erased: overwrite their matrices with zeros now, the
        ones handed out to callers too, and drop them."""
        for key in [key for key in self._entries if key[0] == uid]:
            self._entries.pop(key).wipe()

    def clear(self, *, erase: bool = False) -> None:
        for key in list(self._entries):
            if erase:
                self._entries.pop(key).wipe()
            else:
                self._drop(key)

    def _drop(self, key: tuple[int, Hashable]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None and not entry.shared:
            entry.wipe()

    def _fit(self, incoming: int) -> None:
        """Drop the least recently used entries until one of `incoming` bytes fits."""
        while self._entries and (
            self.used + incoming > self._budget or len(self._entries) >= self._max_entries
        ):
            self._drop(next(iter(self._entries)))
