"""onnxruntime sessions from the graph optimized once (`onnx_session`): the same outputs,
bit for bit, as a session that optimizes the model itself; a copy that changed, or a folder
that cannot be written, costs only the speed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_pllm.inference.bundle import load_bundle
from edge_pllm.inference.embedder import Embedder
from edge_pllm.inference.onnx_session import open_session

TEXTS = [
    "fix(parser): handle blank lines at the end of the file",
    "The spare house key is under the blue flower pot by the door. " * 6,
    "docs: explain how the cache directory is chosen",
    "ok",
]


@pytest.fixture
def models(default_bundle: Path, tmp_path: Path) -> Path:
    """The default bundle's ONNX files and tokenizer in a folder of their own."""
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("embedder.onnx", "tokenizer.json", "plug.onnx", "plug_project.onnx"):
        shutil.copy(default_bundle / name, folder / name)
    return folder


def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files onnxruntime is asked to open, in order."""
    import onnxruntime as ort  # after edge_pllm, which sets its environment

    seen: list[str] = []
    real = ort.InferenceSession

    def spy(path, *args, **kwargs):
        seen.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    return seen


def embed(default_bundle: Path, models: Path) -> np.ndarray:
    config = load_bundle(default_bundle).embedder.config
    embedder = Embedder(models / "embedder.onnx", models / "tokenizer.json", config)
    return np.stack([embedder.embed_one(t) for t in TEXTS])


def test_the_optimized_copy_gives_the_same_vectors_bit_for_bit(default_bundle, models, monkeypatch):
    seen = opened(monkeypatch)
    first = embed(default_bundle, models)  # optimizes, and keeps the graph
    assert seen == ["embedder.onnx"]
    copies = {p.suffix for p in (models / ".ort").glob("embedder-*")}
    assert copies == {".onnx", ".json"}
    again = embed(default_bundle, models)
    assert seen[1].startswith("embedder-") and seen[1].endswith(".onnx")  # the copy
    assert np.array_equal(first, again)
    assert (os.stat(models / ".ort").st_mode & 0o777) == 0o700


def test_the_heads_graphs_give_the_same_outputs_from_their_copies(models):
    rng = np.random.default_rng(0)
    history = rng.normal(size=(1, 7, 384)).astype(np.float32)
    outputs = []
    for _ in range(2):  # optimized by onnxruntime, then from the copy
        project = open_session(models / "plug_project.onnx")
        plug = open_session(models / "plug.onnx")
        projected = project.run(None, {"history": history})[0]
        feeds = {
            "query": history[:, 0],
            "history": history,
            "mask": np.ones((1, 7), np.float32),
            "projected": projected,
        }
        outputs.append([projected, *plug.run(None, feeds)])
    assert len(list((models / ".ort").glob("*.onnx"))) == 2
    for a, b in zip(*outputs, strict=True):
        assert np.array_equal(a, b)


def test_a_changed_copy_is_made_again_from_the_model(default_bundle, models, monkeypatch):
    first = embed(default_bundle, models)
    (copy,) = (models / ".ort").glob("embedder-*.onnx")
    with copy.open("ab") as fh:
        fh.write(b"\0")  # damaged after it was stamped
    seen = opened(monkeypatch)
    assert np.array_equal(embed(default_bundle, models), first)
    assert seen == ["embedder.onnx"]  # the model itself, optimized again
    assert len(list((models / ".ort").glob("embedder-*.onnx"))) == 1


def test_where_no_copy_can_be_kept_the_model_is_optimized_each_time(default_bundle, models):
    first = embed(default_bundle, models)
    shutil.rmtree(models / ".ort")
    (models / ".ort").write_text("a file where the folder would go")  # no folder: no copy
    assert np.array_equal(embed(default_bundle, models), first)
    assert (models / ".ort").read_text() == "a file where the folder would go"
