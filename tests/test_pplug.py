"""Persona-Plug through the real path: tiny Llama -> GGUF -> bundle -> head (torch) ->
ONNX -> onnxruntime -> soft tokens -> llama.cpp."""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs the [export] extra")

from edge_pllm import BundleError, LLMConfig, PersonalLLM, SamplingConfig  # noqa: E402
from edge_pllm.errors import InvalidInputError  # noqa: E402
from edge_pllm.inference.bundle import file_entries, load_bundle  # noqa: E402
from edge_pllm.inference.llm import LLM  # noqa: E402
from edge_pllm.personalization.head import PlugHead, QueryTokenizer  # noqa: E402
from edge_pllm.storage.vector_cache import VectorCache  # noqa: E402
from edge_pllm.tasks.lamp import task_spec  # noqa: E402
from export import pplug  # noqa: E402
from export.bundle import attach_head, build_bundle  # noqa: E402
from export.defaults import default_embedder_source  # noqa: E402
from export.llm import convert_hf  # noqa: E402

from .tiny_models import make_tiny_llama  # noqa: E402

SPEC = task_spec("LaMP_7")
HISTORY = {
    "ann": ["Tomatoes need full sun.", "Compost the leaves in autumn.", "Pruning roses today."],
    "bob": ["SELECT count(*) FROM users;", "Add an index on email.", "Vacuum the tables."],
}


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pplug")
    tiny = make_tiny_llama(root / "tiny", std=0.5)
    gguf = convert_hf(tiny, root / "tiny.f32.gguf", outtype="f32", pre="gpt-2", progress=False)
    bundle = build_bundle(
        root / "bundle", llm_gguf=gguf, embedder_source=default_embedder_source(), report=False
    )
    return tiny, bundle


@pytest.fixture(scope="module")
def trained(tiny_bundle, tmp_path_factory):
    tiny, bundle = tiny_bundle
    examples = [
        pplug.Example.of_texts(user, SPEC.query("Say my word."), texts, word)
        for (user, texts), word in zip(HISTORY.items(), ["parser", "docs"], strict=True)
    ]
    out = tmp_path_factory.mktemp("train")
    config = small_config(tiny, steps=6, checkpoint_every=3)
    head, result = pplug.train(bundle, examples, SPEC, out, config, progress=False)
    onnx = pplug.export_onnx(head, out / "plug.onnx")
    attach_head(bundle, onnx, pplug.head_spec(head, load_bundle(bundle), {"steps": 6}))
    return head, result, examples, out


def small_config(tiny: Path, **changes) -> pplug.TrainConfig:
    """The default head (soft tokens before the answer, 4 persona tokens, centred, τ) on the
    tiny LLM, for a few steps."""
    return pplug.TrainConfig(
        **{"steps": 2, "batch_size": 2, "dropout_copies": 1, "llm_source": str(tiny), **changes}
    )


def vectors(bundle: Path, texts: list[str]) -> np.ndarray:
    from edge_pllm.inference.embedder import Embedder

    b = load_bundle(bundle)
    return Embedder(b.file(b.embedder.file), b.file(b.embedder.tokenizer), b.embedder.config).embed(
        texts
    )


def device_matches_torch(head, bundle: Path) -> list[np.ndarray]:
    """The soft tokens the bundle's attached head gives on the device (onnxruntime) for each
    user's history, checked equal to the torch head's."""
    runtime = PlugHead(load_bundle(bundle))
    q = vectors(bundle, ["Say my word."])[0]
    found = []
    for texts in HISTORY.values():
        h = vectors(bundle, texts)
        with torch.no_grad():
            expected = head(
                torch.from_numpy(q[None]), torch.from_numpy(h[None]), torch.ones(1, len(h))
            )[0].numpy()
        got = runtime.soft_tokens(q, h)
        assert got.shape == (runtime.n_soft, 64)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
        found.append(got)
    return found


def test_torch_head_and_onnx_head_give_the_same_soft_tokens(tiny_bundle, trained):
    _, bundle = tiny_bundle
    head = trained[0]
    assert head.config.placement == "before_answer" and head.config.n_persona == 4
    for got in device_matches_torch(head, bundle):
        assert got.shape == (5, 64)
        norms = np.linalg.norm(got, axis=1)
        np.testing.assert_allclose(norms, head.config.embed_norm, rtol=1e-4)


def test_transformers_and_llama_cpp_agree_with_soft_tokens(tiny_bundle, trained):
    from transformers import AutoModelForCausalLM

    tiny, bundle = tiny_bundle
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    llm = LLM(load_bundle(bundle).file("llm.gguf"), LLMConfig(n_ctx=256))
    runtime = PlugHead(load_bundle(bundle))
    prompt = llm.apply_chat_template([{"role": "user", "content": "Say my word."}])
    embed = model.get_input_embeddings()
    for placement in ("before_answer", "prefix"):
        before, after = llm.split_prompt(prompt, placement)
        assert before + after == llm.tokenize(prompt)
        assert (len(after) == len(llm.tokenize(llm.answer_header))) == (placement != "prefix")
        for texts in HISTORY.values():
            q = vectors(bundle, ["Say my word."])[0]
            soft = runtime.soft_tokens(q, vectors(bundle, texts))
            cpp = llm.next_token_logits(before + after, soft=soft, at=len(before))
            with torch.no_grad():
                embeds = torch.cat(
                    [
                        embed(torch.tensor(before, dtype=torch.long)),
                        torch.from_numpy(soft),
                        embed(torch.tensor(after, dtype=torch.long)),
                    ]
                )
                ref = model(inputs_embeds=embeds[None]).logits[0, -1].numpy()
            assert int(cpp.argmax()) == int(ref.argmax())
            np.testing.assert_allclose(cpp, ref, atol=0.05)  # llama.cpp's KV cache is f16


def test_cached_request_keys_and_values_give_the_loss_of_the_whole_sequence(tiny_bundle, trained):
    """Training runs [soft][answer header][target] on top of the request's keys and values,
    computed once and kept in fp16, left-padded in a batch: the loss equals one forward
    pass over the whole sequence, example by example."""
    tiny, bundle = tiny_bundle
    head, _, examples, _ = trained
    b = load_bundle(bundle)
    llm = pplug.load_frozen_llm(b, tiny)
    runtime = LLM(b.file(b.llm.file), LLMConfig(n_ctx=512))
    encode = pplug.PromptEncoder(runtime, SPEC, 448, "before_answer")
    long = pplug.Example.of_texts("cy", SPEC.query("Say my word. " * 9), ["a note"], "run")
    batch = [*examples, long]  # prefixes of different lengths: padded
    encoded = [encode(e) for e in batch]
    assert len({len(e.before) for e in encoded}) > 1 and all(e.after for e in encoded)
    q = torch.from_numpy(vectors(bundle, [e.query for e in batch]))
    hists = [vectors(bundle, e.texts) for e in batch]
    with torch.no_grad():
        soft = pplug.soft_tokens(head, (q,), hists)
        cached = pplug.FrozenPrefix(llm, encoded, progress=False)
        losses, mask = pplug.token_losses(llm, encoded, soft, runtime.embed_scale, cached.kv)
        embed = llm.get_input_embeddings()
        for i, e in enumerate(encoded):
            ids = lambda xs: embed(torch.tensor(xs, dtype=torch.long))  # noqa: E731
            whole = torch.cat([ids(e.before), soft[i], ids(e.after + e.target)])
            logits = llm(inputs_embeds=whole[None]).logits[0]
            start = len(e.before) + len(soft[i]) + len(e.after) - 1
            ref = torch.nn.functional.cross_entropy(
                logits[start : start + len(e.target)], torch.tensor(e.target), reduction="none"
            )
            got = losses[i][mask[i]]
            # fp16 keys and values: close, not equal
            np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=2e-2, rtol=2e-2)


def test_several_task_and_persona_tokens_through_the_device_path(tiny_bundle, trained, tmp_path):
    """A head with 2 task tokens, 3 persona tokens and a learned attention scale: each
    persona token attends over the history on its own, and the device (split ONNX graphs,
    onnxruntime) gives the torch head's 2 + 3 soft tokens."""
    tiny, bundle = tiny_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    examples = trained[2]
    config = small_config(
        tiny, persona_tokens=3, task_tokens=2, attention_scale=10.0, placement="prefix"
    )
    head, _ = pplug.train(copy, examples, SPEC, tmp_path / "out", config, progress=False)
    onnx = pplug.export_onnx(head, tmp_path / "out" / "plug.onnx")
    spec = pplug.head_spec(head, load_bundle(copy), {"steps": 2})
    assert spec.n_soft == 5 and spec.extra["n_persona"] == 3 and spec.extra["n_task"] == 2
    assert spec.placement == "prefix"
    # τ was trained: it moved from where it started, and the device runs the moved value.
    tau = spec.extra["attention_scale"]
    assert tau != pytest.approx(10.0, abs=1e-4)
    assert tau == pytest.approx(float(head.log_scale.detach().exp()), rel=1e-3)
    # The population mean is in the head, and the device's graphs carry it.
    assert float(head.history_mean.norm()) > 0.1
    attach_head(copy, onnx, spec)
    first, *_, got = device_matches_torch(head, copy)
    assert got.shape == (5, 64)
    task, persona = got[:2], got[2:]
    # The task tokens are the same for every user, and differ from one another.
    np.testing.assert_array_equal(first[:2], task)
    assert np.abs(task[0] - task[1]).max() > 1e-3
    # The persona tokens differ from one another
    assert np.abs(persona[0] - persona[1]).max() > 1e-3
    assert np.abs(persona[1] - persona[2]).max() > 1e-3
    # Attaching wrote μ as the population history: the device's persona of a newcomer.
    from edge_pllm.inference.bundle import POPULATION_FILE
    from edge_pllm.personalization.head import PlugHead

    attached = load_bundle(copy)
    assert attached.plug is not None and attached.plug.population_file == POPULATION_FILE
    population = PlugHead(attached).population
    assert population.shape == (1, head.config.d_enc)
    assert np.allclose(population[0], head.history_mean.numpy(), atol=1e-7)


def copied_checkpoint(trained, tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the trained run's folder (to edit its checkpoint), and that checkpoint."""
    moved = tmp_path / "out"
    shutil.copytree(trained[3], moved)
    return moved, torch.load(moved / "checkpoint.pt", weights_only=False)


def test_checkpoint_resumes_when_the_embedding_norm_differs_in_its_last_bits(
    tiny_bundle, trained, tmp_path
):
    """The norm is a float summed on whatever device trained: a checkpoint written on
    another device may differ in its last bits, and still resumes; another head does not."""
    tiny, bundle = tiny_bundle
    examples = trained[2]
    moved, state = copied_checkpoint(trained, tmp_path)
    norm = state["head_config"]["embed_norm"]
    state["head_config"]["embed_norm"] = float(np.nextafter(norm, np.inf, dtype=np.float64))
    torch.save(state, moved / "checkpoint.pt")
    steps = state["step"]
    config = small_config(tiny, steps=steps)
    _, resumed = pplug.train(bundle, examples, SPEC, moved, config, progress=False)
    assert resumed.losses == state["losses"]
    state["head_config"]["embed_norm"] = norm * 1.01
    torch.save(state, moved / "checkpoint.pt")
    with pytest.raises(InvalidInputError, match="another head"):
        pplug.train(bundle, examples, SPEC, moved, config, progress=False)


def test_a_run_resumes_only_with_the_settings_it_was_trained_with(tiny_bundle, trained, tmp_path):
    """Another learning rate, number of steps or choice of examples would continue as a
    run that neither the checkpoint nor its recorded command describes: refused, naming
    the flags, the checkpoint untouched. Where and how fast it runs may change (threads,
    device), and where its folders are (the LLM's folder, given another way)."""
    tiny, bundle = tiny_bundle
    examples = trained[2]
    moved, state = copied_checkpoint(trained, tmp_path)
    before = (moved / "checkpoint.pt").read_bytes()
    steps = state["step"]
    for change, said in [
        ({"lr": 5e-4}, "--lr 0.001 (now 0.0005)"),
        ({"steps": steps + 2}, f"--steps {steps} (now {steps + 2})"),
        ({"limit": 1}, "--limit unset (now 1)"),
        ({"splits": ("train", "extra")}, "--split train (now train extra)"),
    ]:
        config = small_config(tiny, **{"steps": steps, **change})
        with pytest.raises(InvalidInputError, match="trained with --") as refused:
            pplug.train(bundle, examples, SPEC, moved, config, progress=False)
        assert said in str(refused.value) and "--init-from" in str(refused.value)
        assert refused.value.field == next(iter(change))
        assert (moved / "checkpoint.pt").read_bytes() == before
    elsewhere = os.path.relpath(tiny)  # the same folder, named another way
    config = small_config(tiny, steps=steps, threads=1, device="cpu", llm_source=elsewhere)
    _, resumed = pplug.train(bundle, examples, SPEC, moved, config, progress=False)
    assert resumed.losses == state["losses"]


def test_a_checkpoint_from_before_task_tokens_resumes_and_trains_on(tiny_bundle, trained, tmp_path):
    """A checkpoint written before `--task-tokens`: one 1-d instruction vector, its Adam
    moments of that shape, no `n_task` in the head's shape. It resumes as one task token
    and keeps training (the moments take the parameter's new shape)."""
    tiny, bundle = tiny_bundle
    examples = trained[2]
    moved, state = copied_checkpoint(trained, tmp_path)
    d_enc = state["head_config"]["d_enc"]
    del state["head_config"]["n_task"]
    state["head"]["instruction"] = state["head"]["instruction"].reshape(d_enc)
    old_moments = 0
    for moments in state["opt"]["state"].values():
        for name, value in moments.items():
            if torch.is_tensor(value) and value.shape == (1, d_enc):
                moments[name] = value.reshape(d_enc)
                old_moments += 1
    assert old_moments == 2  # exp_avg and exp_avg_sq of the instruction vector
    del state["config"]  # nor did it keep its settings: it resumes with more steps
    torch.save(state, moved / "checkpoint.pt")
    config = small_config(tiny, steps=state["step"] + 2)
    head, resumed = pplug.train(bundle, examples, SPEC, moved, config, progress=False)
    assert resumed.losses[: state["step"]] == state["losses"]
    assert len(resumed.losses) == state["step"] + 2 and np.isfinite(resumed.losses).all()
    assert head.instruction.shape == (1, d_enc)


@pytest.mark.parametrize(
    "settings",
    [
        {},  # batches and history dropout: Python's random stream
        {"input_encoder": "trainable", "rag": 1, "adapter_rank": 2},  # + torch's: dropout
        {"outcome_samples": 2},  # + torch's: sampled answers, and their scores
    ],
    ids=["linear", "trainable-rag-adapter", "outcome-samples"],
)
def test_a_run_cut_short_and_resumed_trains_the_head_of_an_uncut_run(
    tiny_bundle, tmp_path, monkeypatch, settings
):
    from export.pplug import training

    tiny, bundle = tiny_bundle
    spec = task_spec("commit_subject")
    examples = pplug.lamp_examples(write_task(tmp_path / "task"), "train", spec, from_profiles=2)
    config = small_config(tiny, steps=5, checkpoint_every=3, **settings)
    whole_head, whole = pplug.train(
        bundle, examples, spec, tmp_path / "whole", config, progress=False
    )

    step = training.train_step

    def cut_after_three(session):
        if session.step == 3:
            raise KeyboardInterrupt
        return step(session)

    monkeypatch.setattr(training, "train_step", cut_after_three)
    with pytest.raises(KeyboardInterrupt):
        pplug.train(bundle, examples, spec, tmp_path / "cut", config, progress=False)
    monkeypatch.undo()
    random.seed(12345)  # a new process: the random streams do not continue by themselves
    torch.manual_seed(12345)
    head, resumed = pplug.train(bundle, examples, spec, tmp_path / "cut", config, progress=False)
    assert resumed.losses == whole.losses and len(whole.losses) == 5
    assert resumed.final_score == whole.final_score
    expected = whole_head.state_dict()
    for name, value in head.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_plug_strategies_on_the_device(tiny_bundle, trained, tmp_path):
    _, bundle = tiny_bundle
    with PersonalLLM(bundle, home=tmp_path, llm_config=LLMConfig(n_ctx=512)) as p:
        for user, texts in HISTORY.items():
            p.add(user, texts)
        plug = p.prepare("ann", "Say my word.", "plug")
        assert plug.personalization.soft_tokens.shape == (5, 64)
        assert plug.placement == "before_answer"
        assert plug.personalization.context == []
        short = SamplingConfig(max_tokens=8)
        both = p.prepare("ann", "Which plants need sun?", "plug+rag:1", short)
        assert both.personalization.soft_tokens is not None
        assert [i.text for i in both.personalization.context] == ["Tomatoes need full sun."]
        ann = p.prepare("ann", "Say my word.", "plug").personalization.soft_tokens
        bob = p.prepare("bob", "Say my word.", "plug").personalization.soft_tokens
        assert np.abs(ann - bob).max() > 1e-3  # each user's own history makes their tokens
        out = p.generate("bob", "Say my word.", strategy="plug", sampling=short)
        assert out.soft_tokens == 5 and out.completion.soft_tokens == 5
        # The request's prefix is the plain prompt's: a plug answer after a plain one
        # reuses the request's keys and values and recomputes only from the soft tokens.
        p.generate("bob", "Say my word.", strategy="none", sampling=short)
        before, _ = p.llm.split_prompt(
            p.prepare("bob", "Say my word.", "none").prompt, "before_answer"
        )
        again = p.generate("bob", "Say my word.", strategy="plug", sampling=short)
        assert again.completion.cached_tokens == len(before)
        assert again.text == out.text
        # A user whose history was all deleted gets the population persona with plug, and
        # the plain prompt with plug-own.
        p.store.delete("ann", [i.id for i in p.store.items("ann")])
        fallback = p.prepare("ann", "Say my word.", "plug").personalization
        assert fallback.info["fallback"] == "no history: population persona"
        newcomer = p.prepare("nobody", "Say my word.", "plug").personalization.soft_tokens
        assert np.array_equal(fallback.soft_tokens, newcomer)
        own = p.prepare("ann", "Say my word.", "plug-own").personalization
        assert own.soft_tokens is None and own.info["fallback"] == "no history: plain prompt"


def test_head_trained_for_another_llm_is_refused(tiny_bundle, trained, tmp_path):
    _, bundle = tiny_bundle
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["plug"]["llm_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="trained for another llm"):
        PlugHead(load_bundle(other))
    with PersonalLLM(other, home=tmp_path / "h", llm_config=LLMConfig(n_ctx=256)) as p:
        p.add("ann", HISTORY["ann"])
        with pytest.raises(BundleError, match="retrain the head"):
            p.generate("ann", "hi", strategy="plug")
        assert p.generate("ann", "hi", strategy="rag").text is not None  # the rest still works


def test_bundle_without_a_head_says_so(tiny_bundle, tmp_path):
    _, bundle = tiny_bundle
    bare = tmp_path / "bare"
    shutil.copytree(bundle, bare)
    manifest = json.loads((bare / "manifest.json").read_text())
    manifest["plug"] = None
    manifest["files"].pop("plug.onnx", None)
    (bare / "manifest.json").write_text(json.dumps(manifest))
    with PersonalLLM(bare, home=tmp_path / "h", llm_config=LLMConfig(n_ctx=256)) as p:
        p.add("ann", HISTORY["ann"])
        assert p.plug is None
        with pytest.raises(BundleError, match="no Persona-Plug head"):
            p.generate("ann", "hi", strategy="plug")


# --- the trainable input encoder (the paper's variant) ------------------------------------

WORDS = {"ann": "garden", "bob": "database"}
LONG_QUERY = "Explain the whole commit. " * 120  # past the embedder's 256-token limit


def write_task(
    folder: Path, inputs: dict[str, str] | None = None, splits: tuple[str, ...] = ("train",)
) -> Path:
    """A two-user commit_subject task in LaMP format: each user's items are titled with
    their word; `inputs` gives a user's question (default: "Say my word."); the same
    questions in each of `splits`."""
    folder.mkdir(parents=True, exist_ok=True)
    questions, golds = [], []
    for user, texts in HISTORY.items():
        profile = [
            {"title": f"{WORDS[user]} {i}", "text": t, "date": f"2024-01-0{i + 1}"}
            for i, t in enumerate(texts)
        ]
        text = (inputs or {}).get(user, "Say my word.")
        questions.append({"id": user, "input": f"Subject for: {text}", "profile": profile})
        golds.append({"id": user, "output": WORDS[user]})
    for split in splits:
        (folder / f"{split}_questions.json").write_text(json.dumps(questions))
        (folder / f"{split}_outputs.json").write_text(
            json.dumps({"task": "commit_subject", "golds": golds})
        )
    return folder


def test_rag_training_shows_what_plug_rag_shows_at_run_time(tiny_bundle, trained, tmp_path):
    """Training with --rag retrieves the items plug+rag:1 retrieves on the device, and
    prompts the LLM with exactly the token ids the device's prompt has."""
    from edge_pllm.inference.embedder import Embedder
    from edge_pllm.tasks.lamp import load_split

    _, bundle = tiny_bundle
    spec = task_spec("commit_subject")
    asks = {"ann": "When should the roses be pruned?", "bob": "Make the email lookups fast."}
    task = write_task(tmp_path / "task", asks)
    examples = pplug.lamp_examples(task, "train", spec, from_profiles=0)
    b = load_bundle(bundle)
    embedder = Embedder(b.file(b.embedder.file), b.file(b.embedder.tokenizer), b.embedder.config)
    texts = [t for e in examples for t in e.texts] + [e.query for e in examples]
    with VectorCache(tmp_path / "vectors.sqlite", embedder.embed, embedder.dim) as cache:
        table = pplug.VectorTable(cache, texts)
    llm = LLM(b.file(b.llm.file), LLMConfig(n_ctx=512))
    encode = pplug.PromptEncoder(llm, spec, 448, "before_answer")
    expected = {"ann": "Pruning roses today.", "bob": "Add an index on email."}
    with PersonalLLM(bundle, home=tmp_path / "home", llm_config=LLMConfig(n_ctx=512)) as p:
        for q in load_split(task, "train").questions():
            p.add(q.id, spec.profile_items(q.profile))
        for e in examples:
            shown = pplug.retrieve(e, table, 1)
            assert [i.text.split("\n\n")[-1] for i in shown] == [expected[e.user]]
            prepared = p.prepare(e.user, e.query, "plug+rag:1", style=spec.style)
            assert [i.text for i in prepared.personalization.context] == [i.text for i in shown]
            encoded = encode(e, shown)
            assert llm.tokenize(prepared.prompt) == encoded.before + encoded.after
            assert f"{WORDS[e.user]} " in prepared.prompt  # the shown item's subject line
    # Without retrieval the prompt is the plain one.
    plain = encode(examples[0])
    assert len(plain.before) < len(encode(examples[0], shown).before)


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"rag": -1}, "rag"),
        ({"rag": 1, "rag_fraction": 1.5}, "rag_fraction"),
        ({"persona_tokens": 0}, "persona_tokens"),
        ({"task_tokens": 0}, "task_tokens"),
        ({"attention_scale": -1.0}, "attention_scale"),
        ({"placement": "middle"}, "placement"),
        ({"validate": "train"}, "validate"),
        ({"outcome_samples": 1}, "outcome_samples"),
    ],
)
def test_bad_head_settings_are_refused_before_training(settings, field):
    with pytest.raises(InvalidInputError, match=r"must be") as error:
        pplug.TrainConfig(steps=1, **settings)
    assert error.value.field == field


@pytest.mark.parametrize(
    "device, message",
    [("gpu0", "Unknown device"), ("meta", "not supported"), ("cuda:99", "not available")],
)
def test_unusable_training_device_is_refused_before_training(
    tiny_bundle, tmp_path, device, message
):
    _, bundle = tiny_bundle
    examples = [pplug.Example.of_texts("ann", SPEC.query("Say my word."), ["a note"], "garden")]
    config = pplug.TrainConfig(steps=1, device=device)
    with pytest.raises(InvalidInputError, match=message) as error:
        pplug.train(bundle, examples, SPEC, tmp_path / "out", config, progress=False)
    assert error.value.field == "device"
    assert not (tmp_path / "out").exists()
    assert pplug.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_validation_pairs_each_user_with_the_next_users_history(tiny_bundle, trained):
    """Held-out losses: each example with its own history, with the next example's, and
    with no soft tokens, each the mean of per-example losses computed one at a time
    (three users in batches of two: the pairing crosses a batch boundary and wraps)."""
    tiny, bundle = tiny_bundle
    head, _, examples, _ = trained
    cy = ["Stretch before the run.", "Ten kilometres today.", "New shoes arrived."]
    examples = [*examples, pplug.Example.of_texts("cy", SPEC.query("Say my word."), cy, "run")]
    b = load_bundle(bundle)
    llm = pplug.load_frozen_llm(b, tiny)
    runtime = LLM(b.file(b.llm.file), LLMConfig(n_ctx=512))
    encode = pplug.PromptEncoder(runtime, SPEC, 448, "before_answer")
    scale = runtime.embed_scale

    def embed(texts):  # one request at a time: int8 vectors vary slightly with the batch
        return np.stack([vectors(bundle, [t])[0] for t in texts])

    def query_inputs(queries):
        return (torch.from_numpy(embed(queries)),)

    checked = pplug.validate(head, llm, examples, encode, embed, query_inputs, scale, 2)
    assert checked.examples == 3
    own = [embed(e.texts) for e in examples]
    expected: dict[str, list[float]] = {"none": [], "plug": [], "plug_other": []}
    with torch.no_grad():
        for i, e in enumerate(examples):
            query = query_inputs([e.query])
            nxt = own[(i + 1) % 3]
            for name, hist in (("none", None), ("plug", own[i]), ("plug_other", nxt)):
                soft = None if hist is None else pplug.soft_tokens(head, query, [hist])
                losses, mask = pplug.token_losses(llm, [encode(e)], soft, scale)
                expected[name].append(float(losses.sum() / mask.sum()))
    for name, values in expected.items():
        assert getattr(checked, name) == pytest.approx(np.mean(values), rel=1e-5), name
    assert checked.gap.value == pytest.approx(checked.plug_other - checked.plug, abs=1e-6)
    assert checked.gap.low <= checked.gap.value <= checked.gap.high
    # Different histories give different losses: the pairing reached the LLM.
    assert checked.plug != pytest.approx(checked.plug_other, rel=1e-6)
    with pytest.raises(InvalidInputError, match="at least two examples"):
        pplug.validate(head, llm, examples[:1], encode, embed, query_inputs, scale)


def test_long_requests_are_clipped_at_their_start_for_training(tmp_path):
    long = "First line says what changed. " + "filler " * 400
    task = write_task(tmp_path / "task", {"ann": long})
    spec = task_spec("commit_subject")
    examples = pplug.lamp_examples(task, "train", spec, max_query_chars=100)
    ann = next(e for e in examples if e.user == "ann" and e.target == WORDS["ann"])
    assert "First line says what changed." in ann.query
    assert len(ann.query) < 100 + len(spec.query(""))
    assert pplug.clip_text("a b c", None) == "a b c"


@pytest.fixture(scope="module")
def trainable(tiny_bundle, tmp_path_factory):
    """A trainable-encoder head with 2 persona tokens and a rank-2 task adapter, trained and
    attached through `edge-pllm train-plug`, and the same head in torch, reloaded from the
    run's final checkpoint."""
    from click.testing import CliRunner

    from edge_pllm.cli import cli

    tiny, bundle = tiny_bundle
    root = tmp_path_factory.mktemp("trainable")
    copy = root / "bundle"
    shutil.copytree(bundle, copy)
    task = write_task(root / "task", splits=("train", "dev"))
    out = root / "train"
    args = ["--bundle", str(copy), "--home", str(root / "home"), "train-plug", str(task)]
    args += ["--steps", "3", "--batch-size", "2", "--llm-source", str(tiny), "-o", str(out)]
    args += ["--validate", "dev", "--persona-tokens", "2"]
    refused = CliRunner().invoke(cli, [*args[:-4], "--validate", "train"])
    assert refused.exit_code != 0 and "a held-out split" in refused.output
    assert not out.exists()
    more = ["--input-encoder", "trainable", "--rag", "1", "--adapter-rank", "2"]
    umask = os.umask(0o022)  # what most accounts have: the outputs must be private anyway
    try:
        result = CliRunner().invoke(cli, [*args, *more])
    finally:
        os.umask(umask)
    assert result.exit_code == 0, result.output
    open_to_others = [
        f"{p} {stat.S_IMODE(p.stat().st_mode):o}"
        for p in [out, *out.rglob("*")]
        if stat.S_IMODE(p.stat().st_mode) & 0o077
    ]
    assert not open_to_others, open_to_others
    examples = pplug.lamp_examples(task, "train", task_spec("commit_subject"), from_profiles=4)
    config = pplug.TrainConfig(
        steps=3,
        batch_size=2,
        input_encoder="trainable",
        rag=1,
        persona_tokens=2,
        adapter_rank=2,
        llm_source=str(tiny),
        validate="dev",
    )
    head, reloaded = pplug.train(
        copy, examples, task_spec("commit_subject"), out, config, root / "home", progress=False
    )
    return copy, head, reloaded, examples, out


def test_train_plug_cli_attaches_a_trainable_encoder_head(trainable):
    bundle, head, reloaded, _, out = trainable
    spec = load_bundle(bundle).manifest["plug"]
    config = spec["config"]
    assert spec["input_encoder"] == "trainable" and spec["placement"] == "before_answer"
    assert spec["inputs"] == ["input_ids", "attention_mask", "history", "mask"]
    assert spec["max_seq_length"] == load_bundle(bundle).embedder.config.max_seq_length
    assert (
        spec["tokenizer_sha256"]
        == load_bundle(bundle).manifest["files"]["tokenizer.json"]["sha256"]
    )
    assert "--input-encoder trainable" in spec["command"] and config["encoder_lr"] == 1e-4
    assert "--rag 1 --rag-fraction 0.5" in spec["command"] and config["rag"] == 1
    assert "--persona-tokens 2" in spec["command"] and spec["n_soft"] == 3
    assert spec["device"] == pplug.device_label(pplug.resolve_device("auto"))
    checked = spec["validation"]
    assert checked["split"] == "dev" and checked["examples"] == 2
    assert checked["gap"][1] <= checked["gap"][0] <= checked["gap"][2]
    assert checked["loss_plug_other"] - checked["loss_plug"] == pytest.approx(
        checked["gap"][0], abs=2e-4
    )
    # The bundle runs the head as two graphs (export/plug_graph.py); otherwise as trained.
    assert spec.pop("project_file") == "plug_project.onnx"
    assert spec.pop("population_file") == "plug_population.npy"  # μ, written on attaching
    # The task adapter: trained, exported for llama.cpp and attached with the head.
    assert spec.pop("adapter_file") == "plug_adapter.gguf" and (out / "plug_adapter.gguf").is_file()
    assert "--adapter-rank 2" in spec["command"] and spec["adapter"] == {"rank": 2, "alpha": 4.0}
    assert json.loads((out / "plug.json").read_text()) == spec
    # The reload ran no step: the 3 losses are the CLI run's, and its encoder was trained.
    assert len(reloaded.losses) == 3
    fresh = pplug.load_input_encoder(load_bundle(bundle))
    trained_weights = head.query_encoder.encoder.state_dict()
    moved = [k for k, v in fresh.state_dict().items() if not torch.equal(v, trained_weights[k])]
    assert len(moved) > 10, "the input encoder's weights did not change"


def test_trainable_encoder_torch_and_onnx_give_the_same_soft_tokens(tiny_bundle, trainable):
    bundle, head, *_ = trainable
    runtime = PlugHead(load_bundle(bundle))
    assert runtime.input_encoder == "trainable" and runtime.reads_text
    b = load_bundle(bundle)
    tokenize = QueryTokenizer(b.file(b.embedder.tokenizer), b.embedder.config.max_seq_length)
    worst = 0.0
    for query in ["Say my word.", "Which plants need sun?", LONG_QUERY]:
        for texts in HISTORY.values():
            h = vectors(bundle, texts)
            ids, mask = tokenize([query])
            with torch.no_grad():
                expected = head(
                    torch.from_numpy(ids),
                    torch.from_numpy(mask),
                    torch.from_numpy(h[None]),
                    torch.ones(1, len(h)),
                )[0].numpy()
            got = runtime.soft_tokens(query, h)
            assert got.shape == (3, 64)
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
            worst = max(worst, float(np.abs(got - expected).max()))
    assert ids.shape[1] == b.embedder.config.max_seq_length  # the long query was truncated
    print(f"trainable head torch vs onnxruntime: max abs diff {worst:.2e}")
    with pytest.raises(TypeError, match="text"):
        runtime.soft_tokens(vectors(bundle, ["Say my word."])[0], h)


def test_a_trainable_encoder_checkpoint_is_not_resumed_as_a_linear_head(
    tiny_bundle, trainable, tmp_path
):
    tiny, _ = tiny_bundle
    bundle, _, _, examples, out = trainable
    spec = task_spec("commit_subject")
    resumed_dir = tmp_path / "train"
    resumed_dir.mkdir()
    shutil.copyfile(out / "checkpoint.pt", resumed_dir / "checkpoint.pt")
    linear = small_config(tiny, steps=5, persona_tokens=2, rag=1, adapter_rank=2)
    with pytest.raises(InvalidInputError, match=r"checkpoint .* another head"):
        pplug.train(bundle, examples, spec, resumed_dir, linear, progress=False)


def test_trainable_encoder_head_on_the_device(trainable, tmp_path):
    bundle, *_ = trainable
    with PersonalLLM(bundle, home=tmp_path, llm_config=LLMConfig(n_ctx=512)) as p:
        for user, texts in HISTORY.items():
            p.add(user, texts)
        assert p.plug is not None and p.plug.reads_text
        ann = p.prepare("ann", "Say my word.", "plug-own").personalization  # no prior
        assert ann.soft_tokens.shape == (3, 64) and ann.context == []
        _, stored = p.store.vectors("ann", limit=512)
        np.testing.assert_array_equal(ann.soft_tokens, p.plug.soft_tokens("Say my word.", stored))
        bob = p.prepare("bob", "Say my word.", "plug-own").personalization.soft_tokens
        assert np.abs(ann.soft_tokens - bob).max() > 1e-3
        both = p.prepare("ann", "Which plants need sun?", "plug+rag:1").personalization
        assert [i.text for i in both.context] == ["Tomatoes need full sun."]
        out = p.generate(
            "bob", "Say my word.", strategy="plug", sampling=SamplingConfig(max_tokens=4)
        )
        assert out.soft_tokens == 3


def test_trainable_encoder_head_for_other_files_is_refused(trainable, tmp_path):
    bundle, *_ = trainable

    def with_plug(**changes) -> Path:
        """The bundle's files (hard-linked, not copied: a bundle refuses symbolic links)
        with a changed `plug` entry."""
        other = tmp_path / f"other{len(list(tmp_path.iterdir()))}"
        other.mkdir()
        for f in bundle.iterdir():
            if f.name != "manifest.json" and not f.name.startswith("."):
                (other / f.name).hardlink_to(f)
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["plug"].update(changes)
        (other / "manifest.json").write_text(json.dumps(manifest))
        return other

    for role in ("llm", "embedder", "tokenizer"):
        with pytest.raises(BundleError, match=f"trained for another {role}"):
            PlugHead(load_bundle(with_plug(**{f"{role}_sha256": "0" * 64})))
    with pytest.raises(BundleError, match="takes inputs"):  # the ONNX file is the trainable one
        PlugHead(load_bundle(with_plug(input_encoder="linear")))
    with pytest.raises(BundleError, match="unknown input encoder"):
        PlugHead(load_bundle(with_plug(input_encoder="lora")))


def test_split_head_equals_the_single_graph_and_projects_once(tiny_bundle, trained):
    """The bundle runs the head as project + aggregate graphs: the soft tokens equal the
    single exported graph's, and a user's projections are computed once while their
    (read-only, cached) history matrix lives."""
    import onnxruntime as ort

    _, bundle = tiny_bundle
    out = trained[3]
    head = PlugHead(load_bundle(bundle))
    single = ort.InferenceSession(str(out / "plug.onnx"))
    rng = np.random.default_rng(5)
    history = rng.normal(size=(40, 384)).astype(np.float32)
    history /= np.linalg.norm(history, axis=1, keepdims=True)
    history.flags.writeable = False
    for _ in range(3):
        query = history[rng.integers(40)] + rng.normal(0, 0.1, 384).astype(np.float32)
        expected = single.run(
            None,
            {"query": query[None], "history": history[None], "mask": np.ones((1, 40), np.float32)},
        )[0][0]
        np.testing.assert_allclose(head.soft_tokens(query, history), expected, atol=1e-5)
    assert head.projected(history) is head.projected(history)
    writable = history.copy()
    assert head.projected(writable) is not head.projected(writable)  # may change: not kept


def test_projections_kept_heads_first_give_the_same_soft_tokens_faster_graph(
    tiny_bundle, trained, tmp_path
):
    """The split writes the projections heads first, (B, k, N, d), and sums them with one
    MatMul; a head split before (item first, an Einsum) gives bit for bit the same soft
    tokens, runs on the device as it is, and `heads_first_files` rewrites it in place."""
    import onnx

    from export.bundle import heads_first_files
    from export.plug_graph import split_head

    _, bundle = tiny_bundle
    out = trained[3]
    new = load_bundle(bundle)
    old_dir = tmp_path / "old"
    shutil.copytree(bundle, old_dir, symlinks=False)
    spec = new.require_plug()
    split_head(out / "plug.onnx", old_dir / spec.file, old_dir / spec.project_file,
               layout_heads_first=False)  # fmt: skip
    manifest = json.loads((old_dir / "manifest.json").read_text())
    manifest["files"].update(file_entries(old_dir, [spec.file, spec.project_file]))
    (old_dir / "manifest.json").write_text(json.dumps(manifest))
    heads = {"new": PlugHead(new), "old": PlugHead(load_bundle(old_dir))}
    rng = np.random.default_rng(7)
    history = rng.normal(size=(40, 384)).astype(np.float32)
    history /= np.linalg.norm(history, axis=1, keepdims=True)
    query = history[3] + rng.normal(0, 0.1, 384).astype(np.float32)
    d, k = spec.d_llm, 4  # small_config's persona tokens
    assert heads["old"].projected(history).shape == (40, k * d)
    assert heads["new"].projected(history).shape == (k, 40, d)
    soft = {name: head.soft_tokens(query, history) for name, head in heads.items()}
    assert np.array_equal(soft["new"], soft["old"])
    ops = [n.op_type for n in onnx.load(str(old_dir / spec.file)).graph.node]
    assert "Einsum" in ops and ops.count("Einsum") == 2
    assert heads_first_files(old_dir) and not heads_first_files(old_dir)  # once
    rewritten = load_bundle(old_dir)  # verified: the manifest names the new files
    ops = [n.op_type for n in onnx.load(str(old_dir / spec.file)).graph.node]
    assert ops.count("Einsum") == 1 and "MatMul" in ops
    assert np.array_equal(PlugHead(rewritten).soft_tokens(query, history), soft["old"])


def test_recorded_command_reproduces_the_head_exactly(tiny_bundle, tmp_path):
    """train-plug records the command that trains its head; running that command again
    gives the same head, weight for weight."""
    import shlex

    from click.testing import CliRunner

    from edge_pllm.cli import cli

    tiny, bundle = tiny_bundle
    task = write_task(tmp_path / "task", splits=("train", "dev"))
    common = ["--bundle", str(bundle), "--home", str(tmp_path / "home")]
    first = [*common, "train-plug", str(task), "--steps", "3", "--batch-size", "2"]
    first += ["--llm-source", str(tiny), "--persona-tokens", "2", "--no-attach"]
    result = CliRunner().invoke(cli, [*first, "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "a" / "plug.json").read_text())
    command = shlex.split(recorded["command"])
    assert command[:2] == ["edge-pllm", "train-plug"] and "--split" in command
    assert recorded["config"]["persona_tokens"] == 2 and recorded["config"]["steps"] == 3
    again = CliRunner().invoke(
        cli, [*common, *command[1:], "--no-attach", "-o", str(tmp_path / "b")]
    )
    assert again.exit_code == 0, again.output
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["head"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["head"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    other = json.loads((tmp_path / "b" / "plug.json").read_text())
    assert other["command"] == recorded["command"] and other["config"] == recorded["config"]


def test_a_head_state_from_before_task_tokens_loads_as_one_task_token():
    """Checkpoints written before `--task-tokens` hold one instruction vector (and, older
    still, `query_map` and no population mean): they resume as a head with one task token."""
    from export.pplug.training import upgrade_state

    config = pplug.HeadConfig(d_enc=8, d_llm=16, embed_norm=1.0)
    head = pplug.PPlugHead(config)
    old = {k.replace("query_encoder.", "query_map.", 1): v for k, v in head.state_dict().items()}
    old["instruction"] = old["instruction"][0]
    del old["history_mean"]
    fresh = pplug.PPlugHead(config)
    fresh.load_state_dict(upgrade_state(old))  # strict: every name and shape
    assert torch.equal(fresh.instruction, head.instruction)
    assert torch.equal(fresh.history_mean, torch.zeros(8))
    with pytest.raises(InvalidInputError, match="n_task"):
        pplug.PPlugHead(pplug.HeadConfig(d_enc=8, d_llm=16, embed_norm=1.0, n_task=0))
