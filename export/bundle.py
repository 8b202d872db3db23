"""Assemble a bundle folder (LLM GGUF + ONNX embedder + manifest) atomically.

The bundle is built in a temporary folder beside the destination and renamed into place
only when complete, so an interrupted build never leaves a half bundle under the final name.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from edge_pllm.defaults import LLM_FILE
from edge_pllm.errors import BundleError, MissingDependencyError
from edge_pllm.files import atomic_write, open_private, private_dir, replacing, replacing_folder
from edge_pllm.inference.bundle import (
    ADAPTER_FILE,
    FORMAT,
    HEAD_FILE,
    MANIFEST,
    POPULATION_FILE,
    PROJECT_FILE,
    PlugSpec,
    check_plug,
    file_entries,
    load_bundle,
    manifest_format,
    verify_files,
)

from .embedder import embedder_manifest_entry, embedder_report, export_embedder
from .plug_graph import heads_first, split_head, write_population


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def tool_versions() -> dict[str, str | None]:
    names = [
        "edge-pllm",
        "llama-cpp-python",
        "gguf",
        "onnxruntime",
        "optimum",
        "optimum-onnx",
        "transformers",
        "torch",
        "sentence-transformers",
        "tokenizers",
    ]
    return {"python": platform.python_version(), **{n: _version(n) for n in names}}


def gguf_fields(path: Path) -> Callable[[str], Any]:
    """A GGUF header's fields: the returned function gives a key's value (None if absent)."""
    try:
        import gguf
    except ImportError as exc:
        raise MissingDependencyError("gguf", "export", "Reading GGUF metadata") from exc
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises bare ValueError/struct errors on junk
        raise BundleError(f"{path} is not a readable GGUF file ({exc}).", file=str(path)) from exc

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    return field


def gguf_info(path: Path) -> dict[str, Any]:
    """Architecture, embedding width, quantization and chat template from a GGUF header."""
    import gguf

    field = gguf_fields(path)
    arch = field("general.architecture")
    if arch is None:
        raise BundleError(f"{path} has no general.architecture; not a model GGUF.", file=str(path))
    n_embd = field(f"{arch}.embedding_length")
    file_type = field("general.file_type")
    try:
        quant = (
            gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
            if file_type is not None
            else "unknown"
        )
    except ValueError:
        quant = f"file_type {file_type}"
    return {
        "architecture": arch,
        "n_embd": int(n_embd),
        "quantization": quant,
        "chat_template": field("tokenizer.chat_template"),
        "n_ctx_train": field(f"{arch}.context_length"),
    }


def _copy_with_progress(src: Path, dst: Path, label: str) -> None:
    size = src.stat().st_size
    with (
        open(src, "rb") as fin,
        open_private(dst, "wb") as fout,
        tqdm(total=size, unit="B", unit_scale=True, desc=label, leave=False) as bar,
    ):
        while chunk := fin.read(4 << 20):
            fout.write(chunk)
            bar.update(len(chunk))
        fout.flush()
        os.fsync(fout.fileno())


def build_bundle(
    dest: str | Path,
    *,
    llm_gguf: str | Path,
    embedder_source: str | Path,
    name: str | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    report: bool = True,
    embedder_quantization: str = "dynamic",
) -> Path:
    """Build a bundle in `dest` from a GGUF file and a sentence-transformers folder, the
    embedder quantized as `embedder_quantization` says (`export.embedder.QUANTIZATIONS`).

    With `report`, the embedder's parity report (cosine and top-5 overlap against
    sentence-transformers, throughput) is measured and recorded in the manifest, and an
    LLM parity report found beside the GGUF (`*.parity.json`, from `export llm`) is too.
    """
    dest, llm_gguf = Path(dest), Path(llm_gguf)
    if dest.exists() and not overwrite:
        raise BundleError(f"{dest} already exists; pass overwrite=True (--rebuild) to replace it.")
    if not llm_gguf.is_file():
        raise BundleError(f"The LLM file {llm_gguf} does not exist.", file=str(llm_gguf))
    info = gguf_info(llm_gguf)
    private_dir(dest.parent)
    with (
        tqdm(total=4, desc="Building bundle", unit="step") as steps,
        replacing_folder(dest) as work,
    ):
        steps.set_postfix_str("copying LLM")
        _copy_with_progress(llm_gguf, work / LLM_FILE, "LLM")
        steps.update()
        steps.set_postfix_str("exporting embedder to ONNX int8")
        emb = export_embedder(embedder_source, work, embedder_quantization)
        parity: dict[str, Any] = {}
        if report:
            steps.set_postfix_str("embedder parity report")
            parity["embedder"] = embedder_report(embedder_source, emb)
            llm_report = llm_gguf.with_name(llm_gguf.name + ".parity.json")
            if llm_report.is_file():
                parity["llm"] = json.loads(llm_report.read_text())
        emb.onnx_fp32.unlink()  # the device needs only the int8 model
        steps.update()
        steps.set_postfix_str("hashing")
        names = [LLM_FILE, emb.onnx_int8.name, emb.tokenizer.name]
        manifest = {
            "format": FORMAT,
            "name": name or dest.name,
            "llm": {"file": LLM_FILE, "source": llm_gguf.name, **info},
            "embedder": embedder_manifest_entry(emb, embedder_source),
            "plug": None,
            "parity": parity,
            "files": file_entries(work, names),
            "tools": tool_versions(),
            **(extra or {}),
        }
        write_manifest(work, manifest)
        steps.update()
        steps.set_postfix_str("verifying")
        load_bundle(work)
        steps.update()
    return dest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Replace `folder`'s manifest.json in one step (a reader never sees half of it)."""
    return atomic_write(folder / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False))


def attach_head(
    bundle_dir: str | Path,
    onnx_path: str | Path,
    spec: PlugSpec | dict[str, Any],
    adapter: str | Path | None = None,
) -> Path:
    """Put a trained Persona-Plug head (its single-graph ONNX file, split into the aggregate
    and project graphs, its task adapter GGUF if it has one, and its `plug` manifest entry)
    into a bundle. `spec` (a `PlugSpec` or its manifest entry, as `export.pplug.head_spec`
    makes) names the LLM and embedder the head was trained for; BundleError if they are
    not this bundle's."""
    bundle_dir = Path(bundle_dir)
    if not isinstance(spec, PlugSpec):
        spec = PlugSpec.from_manifest(bundle_dir, spec)
    spec = replace(
        spec,
        file=HEAD_FILE,
        project_file=PROJECT_FILE,
        population_file=None,
        adapter_file=ADAPTER_FILE if adapter is not None else None,
    )

    def write(folder: Path) -> PlugSpec:
        if adapter is not None:
            shutil.copyfile(adapter, folder / ADAPTER_FILE)
        split_head(onnx_path, folder / HEAD_FILE, folder / PROJECT_FILE)
        if write_population(folder / PROJECT_FILE, folder / POPULATION_FILE):
            return replace(spec, population_file=POPULATION_FILE)
        return spec

    return _install_head(bundle_dir, spec, write)


def copy_head(bundle_dir: str | Path, source: str | Path) -> Path:
    """Put the head of another bundle (or of a bundle's shipped parts, `models/default`),
    already split, into `bundle_dir`; BundleError if it was trained for other files."""
    source = Path(source)
    parts = load_bundle(source, verify=False)
    spec = parts.require_plug()
    names = spec.files
    entries = parts.manifest["files"]

    def write(folder: Path) -> PlugSpec:
        for name in names:
            shutil.copyfile(source / name, folder / name)
        verify_files(folder, {name: entries[name] for name in names})
        return spec

    return _install_head(Path(bundle_dir), spec, write)


def _install_head(bundle_dir: Path, spec: PlugSpec, write: Callable[[Path], PlugSpec]) -> Path:
    """Write the head's files with `write` (which returns the spec of what it wrote) and
    its manifest entry, and check the bundle loads with it."""
    bundle = load_bundle(bundle_dir)
    check_plug(bundle, spec)
    spec = write(bundle_dir)
    manifest = dict(bundle.manifest)
    manifest["format"] = manifest_format(spec)
    manifest["plug"] = spec.to_manifest()
    files = dict(manifest["files"])
    for stale in set(bundle.plug.files if bundle.plug else []) - set(spec.files):
        files.pop(stale, None)  # the previous head's file that this one lacks
        (bundle_dir / stale).unlink(missing_ok=True)
    manifest["files"] = {**files, **file_entries(bundle_dir, spec.files)}
    write_manifest(bundle_dir, manifest)
    load_bundle(bundle_dir)
    return bundle_dir


def heads_first_files(folder: str | Path) -> bool:
    """Rewrite the split head of the bundle (or shipped parts) in `folder` with
    `heads_first`, and its manifest's entries for the two files: the same soft tokens from
    a faster graph. False (nothing written) for a head that is not split, or is already."""
    import onnx

    folder = Path(folder)
    spec = load_bundle(folder, verify=False).require_plug()
    if spec.project_file is None:
        return False
    paths = [folder / spec.file, folder / spec.project_file]
    aggregate, project = (onnx.load(str(p)) for p in paths)
    if not heads_first(aggregate, project):
        return False
    for model, path in zip((aggregate, project), paths, strict=True):
        with replacing(path) as written:
            onnx.save(model, str(written))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"].update(file_entries(folder, [spec.file, spec.project_file]))
    write_manifest(folder, manifest)
    return True
