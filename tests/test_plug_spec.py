"""The manifest's `plug` entry (`PlugSpec`): parsed and written back unchanged, and checked
against its bundle in one place, where a head trained for other files or of other widths
is refused without failing the rest of the bundle. Runs on a small fake bundle: loading
hashes the files but opens no model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_pllm.errors import BundleError
from edge_pllm.inference.bundle import (
    ADAPTER_FORMAT,
    FORMAT,
    MANIFEST,
    PlugSpec,
    check_plug,
    file_entries,
    load_bundle,
)

FILES = ["llm.gguf", "embedder.onnx", "tokenizer.json", "plug.onnx", "plug_project.onnx"]
D_ENC, D_LLM = 384, 576


def fake_bundle(folder: Path, **plug_changes: Any) -> Path:
    """A bundle of small stand-in files whose head was trained for exactly them (a
    `trainable` one), with `plug_changes` applied to its `plug` entry (None: delete)."""
    folder.mkdir()
    for name in FILES:
        (folder / name).write_bytes(f"stand-in for {name}".encode())
    files = file_entries(folder, FILES)
    plug = {
        "file": "plug.onnx",
        "project_file": "plug_project.onnx",
        "n_soft": 3,
        "d_enc": D_ENC,
        "d_llm": D_LLM,
        "max_history": 512,
        "input_encoder": "trainable",
        "max_seq_length": 256,
        "llm_sha256": files["llm.gguf"]["sha256"],
        "embedder_sha256": files["embedder.onnx"]["sha256"],
        "tokenizer_sha256": files["tokenizer.json"]["sha256"],
        "steps": 300,
    }
    for key, value in plug_changes.items():
        if value is None:
            plug.pop(key, None)
        else:
            plug[key] = value
    manifest = {
        "format": FORMAT,
        "name": "fake",
        "llm": {"file": "llm.gguf", "architecture": "llama", "n_embd": D_LLM},
        "embedder": {"file": "embedder.onnx", "tokenizer": "tokenizer.json", "dim": D_ENC},
        "plug": plug,
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


COMMITTED_STYLE = {  # as models/default-plug/plug.json was written before `placement`
    "file": "plug.onnx",
    "n_soft": 2,
    "d_enc": D_ENC,
    "d_llm": D_LLM,
    "max_history": 512,
    "input_encoder": "frozen encoder + learned linear map",
    "llm_sha256": "a" * 64,
    "embedder_sha256": "b" * 64,
    "task": "commit_subject",
    "steps": 300,
    "command": "edge-pllm train-plug data --steps 300",
    "validation": {"split": "dev", "gap": [0.1, 0.05, 0.15]},
}


def test_an_entry_round_trips_through_the_spec(tmp_path: Path):
    spec = PlugSpec.from_manifest(tmp_path, COMMITTED_STYLE)
    assert spec.input_encoder == "linear"  # the legacy wording, mapped
    assert spec.placement == "prefix" and spec.project_file is None
    assert spec.extra["validation"] == COMMITTED_STYLE["validation"]
    assert spec.to_manifest() == {**COMMITTED_STYLE, "input_encoder": "linear"}
    full = {
        **COMMITTED_STYLE,
        "input_encoder": "trainable",
        "project_file": "plug_project.onnx",
        "max_seq_length": 128,
        "tokenizer_sha256": "c" * 64,
        "placement": "before_answer",
        "inputs": ["input_ids", "attention_mask", "history", "mask"],
    }
    parsed = PlugSpec.from_manifest(tmp_path, full)
    assert parsed.placement == "before_answer" and parsed.max_seq_length == 128
    assert parsed.to_manifest() == full
    assert PlugSpec.from_manifest(tmp_path, parsed.to_manifest()) == parsed


def test_an_entry_without_the_keys_added_later_gets_their_old_meaning(tmp_path: Path):
    oldest = {k: COMMITTED_STYLE[k] for k in ("d_enc", "d_llm", "llm_sha256", "embedder_sha256")}
    spec = PlugSpec.from_manifest(tmp_path, oldest)
    assert (spec.file, spec.n_soft, spec.max_history) == ("plug.onnx", 2, 512)
    assert (spec.input_encoder, spec.placement, spec.extra) == ("linear", "prefix", {})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"d_llm": "576"}, "d_llm must be a positive integer"),
        ({"n_soft": 0}, "n_soft must be a positive integer"),
        ({"max_history": True}, "max_history must be a positive integer"),
        ({"llm_sha256": None}, "llm_sha256 must be present"),
        ({"embedder_sha256": 5}, "embedder_sha256 must be a non-empty string"),
        ({"input_encoder": "lora"}, "unknown input encoder 'lora'"),
        ({"input_encoder": ["linear"]}, "unknown input encoder"),
        ({"project_file": ""}, "project_file must be a non-empty string"),
        ({"placement": "suffix"}, "unknown placement 'suffix'"),
        ({"file": "../outside.onnx"}, "not a path inside the bundle"),
    ],
)
def test_a_malformed_entry_is_refused_saying_what_is_wrong(tmp_path: Path, changes, message):
    entry = {k: v for k, v in COMMITTED_STYLE.items() if changes.get(k, 0) is not None}
    entry.update({k: v for k, v in changes.items() if v is not None})
    with pytest.raises(BundleError, match=message) as err:
        PlugSpec.from_manifest(tmp_path, entry)
    assert "retrain the head" in str(err.value) or "rebuild the bundle" in str(err.value)
    with pytest.raises(BundleError, match="not an object"):
        PlugSpec.from_manifest(tmp_path, ["plug.onnx"])


def test_a_head_trained_for_this_bundle_is_its_plug(tmp_path: Path):
    bundle = load_bundle(fake_bundle(tmp_path / "b"))
    assert bundle.plug_error is None and bundle.require_plug() is bundle.plug
    assert bundle.plug.input_encoder == "trainable" and bundle.plug.extra == {"steps": 300}
    assert bundle.plug.to_manifest() == bundle.manifest["plug"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"tokenizer_sha256": "0" * 64}, "trained for another tokenizer"),
        ({"tokenizer_sha256": None}, "trained for another tokenizer"),
        ({"llm_sha256": "0" * 64}, "trained for another llm"),
        ({"embedder_sha256": "0" * 64}, "trained for another embedder"),
        ({"d_llm": 2048}, "maps 384→2048 but the bundle needs 384→576"),
        ({"d_enc": 768}, "maps 768→576 but the bundle needs 384→576"),
        ({"input_encoder": "lora"}, "unknown input encoder"),
    ],
)
def test_a_head_that_does_not_fit_is_refused_and_the_bundle_still_loads(
    tmp_path: Path, changes, message
):
    bundle = load_bundle(fake_bundle(tmp_path / "b", **changes))
    assert bundle.plug is None and bundle.embedder.file == "embedder.onnx"
    assert message in str(bundle.plug_error)
    with pytest.raises(BundleError, match=message) as err:
        bundle.require_plug()
    assert "retrain the head" in str(err.value) or "update edge-pllm" in str(err.value)


def test_a_linear_head_is_not_tied_to_the_tokenizer(tmp_path: Path):
    folder = fake_bundle(tmp_path / "b", input_encoder="linear", tokenizer_sha256="0" * 64)
    bundle = load_bundle(folder)
    assert bundle.plug is not None and bundle.plug.input_encoder == "linear"
    other = PlugSpec.from_manifest(
        folder, {**bundle.manifest["plug"], "input_encoder": "trainable"}
    )
    with pytest.raises(BundleError, match="trained for another tokenizer"):
        check_plug(bundle, other)


def test_no_head_is_no_plug_and_says_how_to_get_one(tmp_path: Path):
    folder = fake_bundle(tmp_path / "b")
    manifest = json.loads((folder / MANIFEST).read_text())
    for empty in (None, {}):
        manifest["plug"] = empty
        (folder / MANIFEST).write_text(json.dumps(manifest))
        bundle = load_bundle(folder)
        assert bundle.plug is None and bundle.plug_error is None
        with pytest.raises(BundleError, match=r"no Persona-Plug head.*train-plug"):
            bundle.require_plug()


def test_a_manifest_of_a_format_this_edge_pllm_does_not_know_is_refused(tmp_path: Path):
    """Both formats load (2: a head with a task adapter); a newer one asks for an upgrade,
    anything else for a rebuild."""
    folder = fake_bundle(tmp_path / "b")
    manifest = json.loads((folder / MANIFEST).read_text())
    for fmt in (FORMAT, ADAPTER_FORMAT):
        manifest["format"] = fmt
        (folder / MANIFEST).write_text(json.dumps(manifest))
        assert load_bundle(folder).plug is not None
    for fmt, advice in ((ADAPTER_FORMAT + 1, "upgrade edge-pllm"), (0, "--rebuild")):
        manifest["format"] = fmt
        (folder / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=f"format {fmt};.*{advice}"):
            load_bundle(folder)


def test_the_head_files_of_a_parsed_head_need_checksums(tmp_path: Path):
    folder = fake_bundle(tmp_path / "b")
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["files"]["plug_project.onnx"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"no checksum for plug_project\.onnx"):
        load_bundle(folder)


@pytest.mark.parametrize(
    "rows",
    [np.zeros((1, 7), np.float32), np.full((1, 384), np.nan, np.float32), np.zeros(384)],
    ids=["wrong width", "not finite", "not a matrix"],
)
def test_a_population_file_that_does_not_fit_the_head_is_refused(bundle_copy: Path, rows):
    from edge_pllm.inference.bundle import (
        MANIFEST,
        POPULATION_FILE,
        STAMP,
        file_entries,
        load_bundle,
    )
    from edge_pllm.personalization.head import PlugHead

    np.save(bundle_copy / POPULATION_FILE, rows)
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["files"].update(file_entries(bundle_copy, [POPULATION_FILE]))
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    (bundle_copy / STAMP).unlink(missing_ok=True)
    with pytest.raises(BundleError, match="population file"):
        PlugHead(load_bundle(bundle_copy))
