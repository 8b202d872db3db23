"""The task adapter through the real path: a LoRA trained with the head on the tiny Llama ->
GGUF LoRA -> bundle -> llama.cpp, acting from the soft tokens on and never on the request."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch", reason="training needs the [export] extra")

from edge_pllm import LLMConfig, PersonalLLM, SamplingConfig  # noqa: E402
from edge_pllm.cli import cli  # noqa: E402
from edge_pllm.errors import BundleError, InvalidInputError  # noqa: E402
from edge_pllm.inference.bundle import ADAPTER_FILE, ADAPTER_FORMAT, FORMAT, load_bundle  # noqa: E402
from edge_pllm.inference.llm import LLM  # noqa: E402
from edge_pllm.personalization.head import PlugHead  # noqa: E402
from edge_pllm.server import create_app  # noqa: E402
from export import pplug  # noqa: E402
from export.bundle import attach_head  # noqa: E402
from export.pplug.adapter import applied  # noqa: E402

from .security_support import asgi_request  # noqa: E402
from .test_pplug import HISTORY, SPEC, small_config, tiny_bundle, vectors  # noqa: E402, F401

PROMPT = [{"role": "user", "content": "Say my word."}]


@pytest.fixture(scope="module")
def adapted(tiny_bundle, tmp_path_factory):  # noqa: F811
    """A head trained with a rank-2 adapter, attached to a copy of the tiny bundle. Its
    B weights are then drawn large, so that the adapter visibly changes the logits (a
    two-step adapter has barely left zero) and a wrong layout could not pass."""
    tiny, bundle = tiny_bundle
    root = tmp_path_factory.mktemp("adapted")
    copy = root / "bundle"
    shutil.copytree(bundle, copy)
    examples = [
        pplug.Example.of_texts(user, SPEC.query("Say my word."), texts, word)
        for (user, texts), word in zip(HISTORY.items(), ["parser", "docs"], strict=True)
    ]
    config = small_config(tiny, adapter_rank=2)
    head, result = pplug.train(copy, examples, SPEC, root / "out", config, progress=False)
    assert head.adapter is not None and np.isfinite(result.final_loss)
    trained_b = [b.detach().abs().max().item() for b in head.adapter.b.values()]
    assert max(trained_b) > 0  # the steps moved it off zero
    torch.manual_seed(1)
    with torch.no_grad():
        for b in head.adapter.b.values():
            b.normal_(0, 0.5)
    onnx = pplug.export_onnx(head, root / "out" / "plug.onnx")
    gguf = pplug.export_adapter(head, root / "out" / ADAPTER_FILE, load_bundle(copy))
    attach_head(copy, onnx, pplug.head_spec(head, load_bundle(copy), {"steps": 2}), gguf)
    return head, copy, tiny


def _torch_logits(model, before, soft, after, adapter: bool) -> np.ndarray:
    """The next token's logits in transformers: the request through the plain model, then
    the soft tokens and the answer's header with the adapter (`adapter`) or without."""
    embed = model.get_input_embeddings()
    with torch.no_grad():
        past = model(input_ids=torch.tensor([before]), use_cache=True).past_key_values
        rest = torch.cat([torch.from_numpy(soft), embed(torch.tensor(after))])
        with applied(model, on=adapter):
            out = model(inputs_embeds=rest[None], past_key_values=past, use_cache=True)
    return out.logits[0, -1].numpy()


def test_llama_cpp_applies_the_adapter_from_the_soft_tokens_on_as_torch_does(adapted):
    from transformers import AutoModelForCausalLM

    head, bundle, tiny = adapted
    b = load_bundle(bundle)
    assert b.plug is not None and b.plug.adapter_file == ADAPTER_FILE
    assert ADAPTER_FILE in b.manifest["files"]  # hashed and verified like every bundle file
    assert b.plug.extra["adapter"] == {"rank": 2, "alpha": 4.0}
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    head.adapter.attach(model)
    llm = LLM(b.file(b.llm.file), LLMConfig(n_ctx=256))
    llm.load_adapter(b.file(ADAPTER_FILE))
    before, after = llm.split_prompt(llm.apply_chat_template(PROMPT), "before_answer")
    q = vectors(bundle, ["Say my word."])[0]
    for texts in HISTORY.values():
        soft = PlugHead(b).soft_tokens(q, vectors(bundle, texts))
        cpp = llm.next_token_logits(before + after, soft=soft, at=len(before))
        ref = _torch_logits(model, before, soft, after, adapter=True)
        plain = _torch_logits(model, before, soft, after, adapter=False)
        assert np.abs(ref - plain).max() > 0.5  # the adapter changes the answer's logits
        assert int(cpp.argmax()) == int(ref.argmax())
        np.testing.assert_allclose(cpp, ref, atol=0.05)  # llama.cpp's KV cache is f16


def test_the_adapter_never_acts_on_the_request_or_a_plain_prompt(adapted):
    """Prompts without soft tokens give the plain model's logits; a request's keys and
    values, computed by a plain prompt, serve a plug prompt after it exactly."""
    _, bundle, _ = adapted
    b = load_bundle(bundle)
    plain = LLM(b.file(b.llm.file), LLMConfig(n_ctx=256))
    llm = LLM(b.file(b.llm.file), LLMConfig(n_ctx=256))
    llm.load_adapter(b.file(ADAPTER_FILE))
    ids = llm.tokenize(llm.apply_chat_template(PROMPT))
    before, after = llm.split_prompt(llm.apply_chat_template(PROMPT), "before_answer")
    soft = PlugHead(b).soft_tokens(
        vectors(bundle, ["Say my word."])[0], vectors(bundle, HISTORY["ann"])
    )
    reference = plain.next_token_logits(ids)
    np.testing.assert_array_equal(llm.next_token_logits(ids), reference)
    first = llm.next_token_logits(before + after, soft=soft, at=len(before))
    # After a plug prompt, the plain prompt reuses only the request and is still plain.
    np.testing.assert_array_equal(llm.next_token_logits(ids), reference)
    assert llm.cached_tokens == len(before) and not llm._adapter_on
    again = llm.next_token_logits(before + after, soft=soft, at=len(before))
    assert llm.cached_tokens == len(before)
    np.testing.assert_allclose(again, first, atol=1e-5)
    llm.reset()
    np.testing.assert_allclose(
        llm.next_token_logits(before + after, soft=soft, at=len(before)), first, atol=1e-5
    )


def test_a_bundle_with_an_adapter_personalizes_with_it(adapted, tmp_path):
    _, bundle, _ = adapted
    short = SamplingConfig(max_tokens=6)
    with PersonalLLM(bundle, home=tmp_path, llm_config=LLMConfig(n_ctx=512)) as p:
        for user, texts in HISTORY.items():
            p.add(user, texts)
        plug = p.generate("ann", "Say my word.", strategy="plug", sampling=short)
        none = p.generate("ann", "Say my word.", strategy="none", sampling=short)
        assert plug.soft_tokens == 5 and none.soft_tokens == 0
        assert p.llm._adapter is not None
    # An edge-pllm from before adapters would run this head without its adapter: the
    # manifest's format is one they refuse (a bundle without an adapter keeps theirs).
    assert load_bundle(bundle).manifest["format"] == ADAPTER_FORMAT > FORMAT
    # A damaged adapter file is refused when the bundle is verified.
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    (damaged / ADAPTER_FILE).write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(BundleError, match=ADAPTER_FILE):
        load_bundle(damaged)


def test_the_manifest_format_follows_the_head(adapted, tmp_path):
    """Format 2 while the head has an adapter; the same bundle given a head without one
    goes back to format 1 (readable by every edge-pllm) and drops the adapter file."""
    head, bundle, _ = adapted
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    assert load_bundle(copy).manifest["format"] == ADAPTER_FORMAT
    onnx = pplug.export_onnx(head, tmp_path / "plug.onnx")
    attach_head(copy, onnx, pplug.head_spec(head, load_bundle(copy), {"steps": 2}))
    plain = load_bundle(copy)
    assert plain.manifest["format"] == FORMAT and plain.plug.adapter_file is None
    assert not (copy / ADAPTER_FILE).exists()


def test_a_file_llama_cpp_cannot_use_as_an_adapter_is_refused(adapted):
    _, bundle, _ = adapted
    b = load_bundle(bundle)
    llm = LLM(b.file(b.llm.file), LLMConfig(n_ctx=256))
    with pytest.raises(BundleError, match="could not load the adapter") as error:
        llm.load_adapter(b.file(b.llm.file))  # a model, not a LoRA
    assert error.value.file == str(b.file(b.llm.file))
    ids = llm.tokenize(llm.apply_chat_template(PROMPT))
    assert np.isfinite(llm.next_token_logits(ids)).all()  # the model works on, plain


def test_a_bundle_whose_adapter_llama_cpp_refuses_answers_plainly_and_refuses_plug(
    adapted, tmp_path
):
    head, bundle, _ = adapted
    broken = tmp_path / "bundle"
    shutil.copytree(bundle, broken)
    b = load_bundle(broken)
    onnx = pplug.export_onnx(head, tmp_path / "plug.onnx")
    # The LLM's GGUF listed and hashed as the adapter: it passes verification, and
    # llama.cpp refuses it as a LoRA.
    attach_head(broken, onnx, pplug.head_spec(head, b, {"steps": 2}), b.file(b.llm.file))
    short = SamplingConfig(max_tokens=4)
    with PersonalLLM(broken, home=tmp_path / "home", llm_config=LLMConfig(n_ctx=512)) as p:
        p.add("ann", HISTORY["ann"])
        assert p.generate("ann", "Say my word.", strategy="none", sampling=short).soft_tokens == 0
        assert p.bundle.plug is None and isinstance(p.bundle.plug_error, BundleError)
        for strategy in ("plug", "plug+rag:1"):
            with pytest.raises(BundleError, match="could not load the adapter"):
                p.generate("ann", "Say my word.", strategy=strategy, sampling=short)
        assert p.generate("ann", "Say my word.", strategy="rag:1", sampling=short).soft_tokens == 0
    # The head is refused before it is used when the model has not been loaded yet.
    with (
        PersonalLLM(broken, home=tmp_path / "home", llm_config=LLMConfig(n_ctx=512)) as p,
        pytest.raises(BundleError, match="could not load the adapter"),
    ):
        p.generate("ann", "Say my word.", strategy="plug", sampling=short)
    # What is offered says so before anything was generated: the server's model listing
    # and the demo's strategies (a head whose adapter fits is offered: `adapted`).
    for folder, usable in ((broken, False), (bundle, True)):
        with PersonalLLM(folder, home=tmp_path / "h2", llm_config=LLMConfig(n_ctx=512)) as p:
            listing = asgi_request(create_app(p), "GET", "/v1/models").json()
            assert listing["data"][0]["plug"] is usable
        demo = CliRunner().invoke(
            cli, ["--bundle", str(folder), "--home", str(tmp_path / "h3"), "--n-ctx", "512", "demo"]
        )
        assert demo.exit_code == 0, demo.output
        assert ("--- plug ---" in demo.output) is usable and "--- rag ---" in demo.output


def test_an_adapter_needs_the_soft_tokens_after_the_request():
    with pytest.raises(InvalidInputError, match="before_answer") as error:
        pplug.TrainConfig(steps=1, adapter_rank=4, placement="prefix")
    assert error.value.field == "placement"


def test_the_adapter_learns_at_its_own_rate(tiny_bundle):  # noqa: F811
    from export.pplug.training import _optimizer

    tiny, bundle = tiny_bundle
    llm = pplug.load_frozen_llm(load_bundle(bundle), tiny)
    head = pplug.PPlugHead(pplug.HeadConfig(d_enc=384, d_llm=64, embed_norm=1.0, adapter_rank=2))
    head.add_adapter(llm)
    opt = _optimizer(head, pplug.TrainConfig(lr=1e-3, adapter_lr=2e-4))
    rates = {len(g["params"]): g["lr"] for g in opt.param_groups}
    n_adapter = len(list(head.adapter.parameters()))
    assert n_adapter == 2 * 2 * 7  # A and B of 7 projections in each of the 2 layers
    assert rates[n_adapter] == 2e-4 and len(opt.param_groups) == 2
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(head.parameters()))
    assert not any(p.requires_grad for p in llm.parameters())  # the LLM itself stays frozen
