"""The LLM export path on a tiny random Llama: HF -> GGUF f16 -> Q8_0 -> runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers", reason="the export path needs the [export] extra")
pytest.importorskip("gguf")

from edge_pllm.errors import BundleError, ExportError, InvalidInputError
from edge_pllm.inference.llm import LLM, LLMConfig
from export import llm as export_llm

from .tiny_models import make_tiny_llama

PROMPTS = ["fix(parser): handle blank", "The quick brown fox", "def add(a, b):", "SELECT name"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def exported(tiny: Path, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    f16 = export_llm.convert_hf(tiny, out / "tiny.f16.gguf", pre="gpt-2", progress=False)
    q8 = export_llm.quantize(f16, out / "tiny.Q8_0.gguf", "Q8_0")
    return {"f16": f16, "Q8_0": q8}


def transformers_next_token(tiny: Path, ids: list[int]) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    with torch.no_grad():
        return int(model(torch.tensor([ids])).logits[0, -1].argmax())


def test_runtime_loads_the_export_and_agrees_with_transformers(tiny, exported):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    for name, path in exported.items():
        llm = LLM(path, LLMConfig(n_ctx=256, n_threads=2))
        assert llm.architecture == "llama" and llm.n_embd == 64
        agree = 0
        for prompt in PROMPTS:
            ids = tok.encode(prompt, add_special_tokens=False).ids
            assert llm.tokenize(prompt) == ids  # same ids on both sides
            agree += int(llm.next_token_logits(ids).argmax()) == transformers_next_token(tiny, ids)
        assert agree == len(PROMPTS), name


def test_parity_reports(tiny, exported):
    f16 = export_llm.parity_report(exported["f16"], tiny)
    q8 = export_llm.parity_report(exported["Q8_0"], tiny)
    assert f16.tokenizer_match and q8.tokenizer_match
    # Over every position of every prompt (next-token agreement is exact: test above).
    assert f16.top1_agreement >= 0.99
    assert q8.top1_agreement >= 0.95
    assert f16.mean_kl < 1e-4 and q8.mean_kl < 1e-2
    assert q8.file_size < f16.file_size
    assert abs(f16.perplexity_gguf / f16.perplexity_source - 1) < 1e-3
    report = export_llm.write_report(exported["Q8_0"], q8.as_dict())
    assert json.loads(report.read_text())["top1_agreement"] == q8.top1_agreement


def test_chat_template_travels_into_the_gguf(exported):
    llm = LLM(exported["f16"], LLMConfig(n_ctx=128))
    assert llm.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_low_bit_requantization_is_refused_unless_forced(exported, tmp_path):
    q4 = export_llm.quantize(exported["f16"], tmp_path / "q4.gguf", "Q4_0")
    with pytest.raises(InvalidInputError, match="already quantized"):
        export_llm.quantize(q4, tmp_path / "again.gguf", "Q8_0")
    assert not (tmp_path / "again.gguf").exists()
    forced = export_llm.quantize(q4, tmp_path / "again.gguf", "Q8_0", force=True)
    assert forced.stat().st_size > 0


def test_existing_output_is_refused_without_overwrite(exported, tiny):
    with pytest.raises(InvalidInputError, match="already exists"):
        export_llm.convert_hf(tiny, exported["f16"], pre="gpt-2", progress=False)
    with pytest.raises(InvalidInputError, match="Unknown quantization"):
        export_llm.quantize(exported["f16"], exported["f16"].with_name("x.gguf"), "Q9_9")


def test_bad_sources_are_typed_errors(tmp_path, tiny):
    with pytest.raises(InvalidInputError, match=r"no config\.json"):
        export_llm.convert_hf(tmp_path, tmp_path / "out.gguf")
    other = tmp_path / "gpt"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(InvalidInputError, match="Unsupported architecture GPTNeoXForCausalLM"):
        export_llm.convert_hf(other, tmp_path / "out.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(BundleError, match="not a readable GGUF"):
        export_llm.quantize(junk, tmp_path / "q.gguf", "Q8_0")


def test_failed_write_leaves_no_file_under_the_final_name(tiny, tmp_path, monkeypatch):
    """A failure mid-write (a full disk, say) leaves neither the output nor its temp file."""
    import gguf

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_llm.convert_hf(tiny, tmp_path / "out.gguf", pre="gpt-2", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_pretokenizer_asks_for_one(tiny):
    with pytest.raises(ExportError, match="unknown pre-tokenizer"):
        export_llm.pre_tokenizer_name(tiny)


def test_f16_weights_match_the_source(tiny, exported):
    import gguf
    from safetensors.numpy import load_file

    reader = gguf.GGUFReader(str(exported["f16"]))
    tensors = {t.name: t for t in reader.tensors}
    src = load_file(str(tiny / "model.safetensors"))
    emb = np.asarray(tensors["token_embd.weight"].data, dtype=np.float32)
    np.testing.assert_allclose(emb, src["model.embed_tokens.weight"], atol=2e-3, rtol=1e-3)
