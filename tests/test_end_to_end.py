"""Slow end-to-end cases (run with `pytest -m slow`; CI runs them)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "commit_subjects"


def edge_pllm(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGE_PLLM_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "edge_pllm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        check=check,
        timeout=900,
    )


def test_demo_on_a_fresh_home_builds_the_bundle_once(tmp_path: Path):
    home = tmp_path / "fresh"
    first = edge_pllm("demo", home=home)
    assert "Added 40 items for sample-author" in first.stdout
    assert "--- none ---" in first.stdout and "--- rag ---" in first.stdout
    manifest = json.loads((home / "bundles" / "default" / "manifest.json").read_text())
    assert manifest["llm"]["quantization"] == "Q4_1"
    again = edge_pllm("demo", "-s", "recent:2", home=home)
    assert "Added 0 items for sample-author (40 already stored)" in again.stdout
    assert "Building bundle" not in again.stderr
    assert "items:     40 (vectors 40, integrity ok)" in edge_pllm("status", home=home).stdout


@pytest.mark.skipif(not DATA.is_dir(), reason="shared/data/commit_subjects is not beside the repo")
def test_lamp_ingest_and_rag_stay_within_each_question_user(tmp_path: Path, default_bundle: Path):
    questions = json.loads((DATA / "dev_questions.json").read_text())[:4]
    sample = tmp_path / "dev_questions.json"
    sample.write_text(json.dumps(questions))
    home = tmp_path / "home"
    bundle = ["--bundle", str(default_bundle)]
    edge_pllm(*bundle, "ingest", str(sample), "--task", "commit_subject", home=home)
    shown_items = 0
    for q in questions:
        shown = edge_pllm(
            *bundle,
            "ask",
            q["id"],
            q["input"][:1500],
            "-s",
            "rag:3",
            "-n",
            "24",
            "--show-context",
            home=home,
        )
        context = [line for line in shown.stderr.splitlines() if line.startswith("[context #")]
        assert len(context) <= 3  # the nearest three, those relevant enough to show
        shown_items += len(context)
        own = [f"{p['title']}\n\n{p['text']}" for p in q["profile"]]
        for line in context:
            head, text = line.split("] ", 1)
            assert re.fullmatch(r"\[context #\d+( part \d+/\d+)?", head), head
            # A long item shows the part found; whole or part, it is this user's own text.
            assert any(text.strip() in entry for entry in own), text
        assert shown.stdout.strip()
    assert shown_items > 0


def test_export_cli_tiny_model_to_bundle_to_generation(tmp_path: Path):
    """HF folder -> GGUF f16 + Q8_0 with parity reports -> bundle -> personalized answer."""
    from edge_pllm import LLMConfig, PersonalLLM, SamplingConfig
    from edge_pllm.personalization.strategies import Retrieval
    from export.defaults import default_embedder_source
    from export.llm import convert_hf

    from .tiny_models import make_tiny_llama

    tiny = make_tiny_llama(tmp_path / "tiny-llama")
    home = tmp_path / "home"
    # The tiny tokenizer's pre-tokenizer fingerprint is unknown to llama.cpp's table, so the
    # f16 step goes through the API with pre="gpt-2"; the CLI takes that GGUF from there on.
    f16 = convert_hf(tiny, tmp_path / "out" / "tiny.f16.gguf", pre="gpt-2", progress=False)
    edge_pllm(
        "export",
        "llm",
        str(f16),
        "-o",
        str(tmp_path / "out2"),
        "-q",
        "Q8_0",
        "--no-report",
        home=home,
    )
    q8 = tmp_path / "out2" / "tiny.f16.Q8_0.gguf"
    assert q8.is_file()
    bundle = tmp_path / "models" / "tiny"
    build = ["export", "bundle", "--llm", str(q8), "--embedder", str(default_embedder_source()),
             "-o", str(bundle)]  # fmt: skip
    dry = edge_pllm(*build, "--dry-run", home=home)
    assert "Would build" in dry.stdout and not bundle.exists()
    edge_pllm(*build, home=home)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["llm"]["quantization"] == "Q8_0" and manifest["llm"]["n_embd"] == 64
    assert manifest["parity"]["embedder"]["int8"]["cosine_mean"] >= 0.99
    with PersonalLLM(bundle, home=home, llm_config=LLMConfig(n_ctx=256)) as pllm:
        pllm.add("u", ["fix(parser): handle blank lines", "docs: explain the cache"])
        every = Retrieval(k=1, min_similarity=-1.0)  # the nearest item, however far
        out = pllm.generate(
            "u", "fix the cache", strategy=every, sampling=SamplingConfig(max_tokens=5)
        )
        assert out.completion.prompt_tokens > 0 and out.context_ids
    exists = edge_pllm(*build, home=home, check=False)
    assert exists.returncode == 1 and "already exists" in exists.stderr


STEPS = 150  # CPU training steps of the synthetic persona test
WORDS = {
    "banana": "tropical fruit, smoothies and breakfast",
    "rocket": "space launches, orbits and engines",
    "violin": "classical music, concerts and practice",
    "glacier": "mountains, ice and hiking",
    "pepper": "spicy cooking, chili and sauces",
    "lantern": "camping at night, tents and campfires",
}
NOTES = [
    "I spent the whole day on {t}.",
    "My notes today are about {t}.",
    "Another long thread on {t}.",
    "Reading a book about {t}.",
    "Question of the week: {t}.",
    "I keep thinking about {t}.",
]


def test_plug_learns_who_the_user_is(default_bundle: Path, tmp_path: Path):
    """Each user always answers with their own word, and only their history says which:
    after a short CPU training `plug` must get it right for (nearly) everyone while `none`,
    which sees the same prompt for all, cannot beat chance."""
    import shutil

    from edge_pllm import LLMConfig, PersonalLLM, SamplingConfig
    from edge_pllm.inference.bundle import load_bundle
    from edge_pllm.tasks.lamp import task_spec
    from export import pplug
    from export.bundle import attach_head

    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle, bundle)
    spec = task_spec("LaMP_7")
    query = spec.query("Say my secret word.")
    histories = {w: [n.format(t=t) for n in NOTES] for w, t in WORDS.items()}
    examples = [pplug.Example.of_texts(w, query, h, w) for w, h in histories.items()]
    config = pplug.TrainConfig(steps=STEPS, batch_size=6, lr=1e-2, dropout_copies=2)
    head, result = pplug.train(bundle, examples, spec, tmp_path / "train", config, progress=False)
    onnx = pplug.export_onnx(head, tmp_path / "plug.onnx")
    attach_head(bundle, onnx, pplug.head_spec(head, load_bundle(bundle), {}))
    hits = {"none": 0, "plug": 0}
    with PersonalLLM(bundle, home=tmp_path / "home", llm_config=LLMConfig(n_ctx=512)) as p:
        for word, texts in histories.items():
            p.add(f"user-{word}", texts)
        for strategy in hits:
            for word in WORDS:
                out = p.generate(
                    f"user-{word}",
                    query,
                    strategy=strategy,
                    style=spec.style,
                    sampling=SamplingConfig(max_tokens=6),
                ).text
                hits[strategy] += word in out.lower()
    assert hits["plug"] >= 0.9 * len(WORDS), (hits, result.losses[-10:])
    assert hits["none"] <= 1, hits
