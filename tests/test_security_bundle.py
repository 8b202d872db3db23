"""Guarantee 7, models are what the manifest says: every file the runtime loads (LLM,
embedder, tokenizer, Persona-Plug graphs) must be listed with its sha256 and is verified
before anything is loaded; a changed or swapped file is refused by name, also when its
size and modification time are kept, and a manifest cannot point outside its bundle.
(tests/test_bundle.py covers flipped bytes in the LLM, embedder and tokenizer, missing
files, malformed manifests and a swap hidden behind the verification stamp.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from edge_pllm import LLMConfig, PersonalLLM
from edge_pllm.errors import BundleError
from edge_pllm.inference.bundle import MANIFEST, load_bundle


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


def write_manifest(bundle: Path, manifest: dict) -> None:
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def loaded_files(bundle: Path) -> list[str]:
    m = manifest_of(bundle)
    names = [m["llm"]["file"], m["embedder"]["file"], m["embedder"]["tokenizer"]]
    if m.get("plug"):
        names.append(m["plug"].get("file", "plug.onnx"))
        if m["plug"].get("project_file"):
            names.append(m["plug"]["project_file"])
    return names


def test_every_loaded_file_has_a_checksum(bundle_copy: Path):
    m = manifest_of(bundle_copy)
    for name in loaded_files(bundle_copy):
        assert len(m["files"][name]["sha256"]) == 64, name


def test_a_swapped_file_keeping_size_and_mtime_is_refused(bundle_copy: Path, tmp_path: Path):
    """Same size, same modification time, different bytes: the stamp's ctime (which ordinary
    programs cannot set back) forces a full re-hash, and the hash refuses it."""
    for name in loaded_files(bundle_copy):
        path = bundle_copy / name
        st = path.stat()
        original = path.read_bytes()
        changed = bytearray(original)
        changed[len(changed) // 3] ^= 0xFF
        path.write_bytes(bytes(changed))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        with pytest.raises(BundleError) as err:
            load_bundle(bundle_copy)
        assert err.value.file == name and name in str(err.value)
        path.write_bytes(original)
        load_bundle(bundle_copy)  # back to good


def test_personal_llm_refuses_a_tampered_bundle_before_loading_models(bundle_copy: Path):
    head = manifest_of(bundle_copy).get("plug", {}).get("file", "embedder.onnx")
    path = bundle_copy / head
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its manifest checksum") as err:
        PersonalLLM(bundle_copy, home=bundle_copy.parent / "home", llm_config=LLMConfig(n_ctx=256))
    assert err.value.file == head


def test_a_loaded_file_without_a_checksum_is_refused(bundle_copy: Path):
    m = manifest_of(bundle_copy)
    if not m.get("plug"):
        pytest.skip("the default bundle carries no Persona-Plug head")
    del m["files"][m["plug"]["file"]]
    write_manifest(bundle_copy, m)
    with pytest.raises(BundleError, match="no checksum for"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    "name", ["../outside.gguf", "/etc/hostname", "sub/../../x.onnx", "", "nul\x00.gguf"]
)
def test_manifest_names_cannot_leave_the_bundle(bundle_copy: Path, name: str):
    outside = bundle_copy.parent / "outside.gguf"
    shutil.copy(bundle_copy / "llm.gguf", outside)
    m = manifest_of(bundle_copy)
    entry = m["files"].pop("llm.gguf")
    m["llm"]["file"] = name
    m["files"][name] = entry  # even with a matching checksum
    write_manifest(bundle_copy, m)
    with pytest.raises(BundleError, match="not a path inside the bundle"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    "files",
    [[], "llm.gguf", {"llm.gguf": "abc"}, {"llm.gguf": {"sha256": 5, "size": 1}}, {"x": None}],
)
def test_malformed_files_section_is_a_bundle_error(bundle_copy: Path, files):
    m = manifest_of(bundle_copy)
    m["files"] = files
    write_manifest(bundle_copy, m)
    with pytest.raises(BundleError):
        load_bundle(bundle_copy)
