"""The one vector cache (evaluation runs and training): each text embedded once across runs,
and a damaged file started anew rather than trusted."""

from __future__ import annotations

import numpy as np
import pytest

from edge_pllm.storage.vector_cache import VectorCache, cache_key


class Counting:
    """An embedder stand-in that records what it was asked to embed (the cache's logic is
    what is tested here; the real embedder is tested in test_embedder.py)."""

    def __init__(self, dim: int = 8):
        self.dim, self.embedded = dim, []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.embedded += texts
        rows = [np.random.default_rng(abs(hash(t)) % 2**32).normal(size=self.dim) for t in texts]
        return np.asarray(rows, dtype=np.float32)


def test_each_text_is_embedded_once_across_runs(tmp_path):
    path = tmp_path / "cache" / "vectors.sqlite"
    embed = Counting()
    with VectorCache(path, embed, embed.dim) as cache:
        first = cache.vectors(["a", "b", "a"])
    assert embed.embedded == ["a", "b"] and first.shape == (3, 8)
    np.testing.assert_array_equal(first[0], first[2])
    with VectorCache(path, embed, embed.dim) as cache:  # a later run
        second = cache.vectors(["c", "b", "a"])
        assert cache.hits == 2 and cache.misses == 1
    assert embed.embedded == ["a", "b", "c"]
    np.testing.assert_array_equal(second[1:], first[[1, 0]])
    with VectorCache(path, embed, embed.dim) as cache:
        assert cache.vectors([]).shape == (0, 8)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_cache_is_started_anew(tmp_path, damage):
    path = tmp_path / "vectors.sqlite"
    embed = Counting()
    with VectorCache(path, embed, embed.dim) as cache:
        cache.vectors([f"text {i}" for i in range(50)])
    whole = path.read_bytes()
    path.write_bytes(b"not a database" * 100 if damage == "garbage" else whole[: len(whole) // 3])
    embed.embedded.clear()
    with pytest.warns(UserWarning, match="unreadable"), VectorCache(path, embed, embed.dim) as c:
        again = c.vectors(["text 1"])
    assert embed.embedded == ["text 1"] and again.shape == (1, 8)
    assert (tmp_path / "vectors.sqlite.damaged").is_file()


def test_rows_of_another_width_are_embedded_again(tmp_path):
    path = tmp_path / "vectors.sqlite"
    with VectorCache(path, Counting(8), 8) as cache:
        cache.vectors(["a"])
    wider = Counting(16)
    with VectorCache(path, wider, 16) as cache:
        assert cache.vectors(["a"]).shape == (1, 16)
    assert wider.embedded == ["a"]


def test_cache_key_says_what_made_the_vectors():
    assert cache_key("sha-a", "mean") == cache_key("sha-a", "mean")
    assert cache_key("sha-a", "mean") != cache_key("sha-a", "cls")
