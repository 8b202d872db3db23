"""The ONNX int8 embedder against the sentence-transformers model it was exported from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_pllm.inference.bundle import load_bundle
from edge_pllm.inference.embedder import Embedder
from export.defaults import default_embedder_source
from export.embedder import ExportedEmbedder

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


def test_a_short_request_does_not_open_a_second_session(default_bundle):
    """Embedding one short request (a generate process) keeps one copy of the model; the
    one-thread session of the worker pool opens for many texts (ingest) only."""
    b = load_bundle(default_bundle)
    fresh = Embedder(b.file(b.embedder.file), b.file(b.embedder.tokenizer), b.embedder.config)
    fresh.embed_one("fix the cache eviction bug")
    assert fresh._single_thread is None
    fresh.embed(_texts()[:4])
    assert (fresh._single_thread is not None) == (fresh.workers > 1)


def test_empty_input_gives_empty_matrix(embedder):
    assert embedder.embed([]).shape == (0, 384)


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory) -> dict[str, ExportedEmbedder]:
    """A tiny random BERT with MiniLM's tokenizer, exported `dynamic` and `per-row`."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("optimum.exporters.onnx")
    from transformers import BertConfig, BertModel

    from export.embedder import export_embedder

    source = default_embedder_source()
    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(config).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    return {q: export_embedder(folder, folder / q, q) for q in ("dynamic", "per-row")}


def test_per_row_model_gives_a_text_the_same_vector_alone_and_batched(tiny_exports):
    texts = SENTENCES[:16]  # short texts of mixed lengths: several batches, padded
    alone = {}
    for quantization, exported in tiny_exports.items():
        embedder = Embedder(exported.onnx_int8, exported.tokenizer, exported.config)
        alone[quantization] = np.stack([embedder.embed_one(t) for t in texts])
        batched = embedder.embed(texts, batch_size=16)
        if quantization == "per-row":
            np.testing.assert_array_equal(batched, alone[quantization])  # bit for bit
            np.testing.assert_array_equal(embedder.embed(texts), batched)  # batches by default
        else:  # the check can fail: per-tensor scales do make batch-mates matter
            assert np.abs(batched - alone[quantization]).max() > 1e-4
    assert ((alone["per-row"] * alone["dynamic"]).sum(axis=1) > 0.95).all()  # same encoder


def test_only_the_per_row_export_is_recorded_batch_invariant(tiny_exports):
    from export.embedder import BATCH_INVARIANT_BATCH_SIZE, embedder_manifest_entry

    per_row = embedder_manifest_entry(tiny_exports["per-row"], "tiny")
    assert per_row["batch_invariant"] is True
    assert per_row["batch_size"] == BATCH_INVARIANT_BATCH_SIZE > 1
    dynamic = embedder_manifest_entry(tiny_exports["dynamic"], "tiny")
    assert "batch_invariant" not in dynamic and "batch_size" not in dynamic
    assert tiny_exports["dynamic"].config.batch_size == 1
