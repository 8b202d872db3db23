"""The ONNX int8 embedder against the sentence-transformers model it was exported from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_pllm.bundle import load_bundle
from edge_pllm.embedder import Embedder
from export.defaults import default_embedder_source

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "commit_subjects"

SENTENCES = [
    "Fix the crash when the config file is empty.",
    "Add a --json flag to the status command.",
    "docs: explain how the cache is invalidated",
    "The quick brown fox jumps over the lazy dog.",
    "Refactor the store so that vectors and rows are written in one transaction.",
    "BUG: fix undefined macro on big-endian platforms",
    "I prefer short, imperative commit subjects.",
    "Bump the minimum supported Python to 3.11.",
    "Was heißt das auf Deutsch? Ça marche très bien.",
    "数据保存在本地设备上。",
    "a",
    "   leading and trailing spaces   ",
    "MAINT: update the vendored meson to 1.4",
    "Remove a stray debug print from the parser.",
    "ENH: add axis keyword to unique",
    'Revert "speed up hashing" since it broke the Windows build.',
    "TST: mark the network tests as slow",
    "The tokenizer must truncate inputs at 256 word pieces. " * 40,
    "git-gui: fix typo in the commit dialog",
    "Merge branch 'maint'",
    "CI: cache pip downloads between runs",
    "scipy.optimize: guard against division by zero in line search",
    "Use a lookup table for unpackbits: 8 times faster.",
    "update",
    "Teach `git log` to show notes by default.",
    "Lower the memory use of rev-list on large repositories.",
    "Python bindings now release the GIL during decode.",
    "fix: handle blank lines in the parser",
    "feat(cli): add a progress bar to ingest",
    "chore: tidy imports",
]


def _texts() -> list[str]:
    texts = list(SENTENCES)
    if (DATA / "dev_questions.json").is_file():  # real commit bodies when the data is there
        questions = json.loads((DATA / "dev_questions.json").read_text())
        texts += [p["text"] for q in questions[:10] for p in q["profile"][:3]]
    return texts


@pytest.fixture(scope="module")
def embedder(default_bundle):
    b = load_bundle(default_bundle)
    return Embedder(b.file(b.embedder.file), b.file(b.embedder.tokenizer), b.embedder.config)


def test_int8_onnx_matches_sentence_transformers(embedder):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(default_embedder_source()), device="cpu")
    texts = _texts()
    expected = reference.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    got = embedder.embed(texts)
    cosine = (expected * got).sum(axis=1)
    assert got.shape == (len(texts), 384)
    assert cosine.mean() >= 0.99, cosine.mean()
    assert cosine.min() >= 0.97, cosine.min()


def test_batching_and_order_do_not_change_vectors(embedder):
    texts = _texts()[:24]
    together = embedder.embed(texts)
    one_by_one = np.stack([embedder.embed_one(t) for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_empty_input_gives_empty_matrix(embedder):
    assert embedder.embed([]).shape == (0, 384)
