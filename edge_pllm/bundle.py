"""Model bundles: a folder with `manifest.json` and the files it names, verified on load.

A bundle is refused when a file is missing, or its size or sha256 differs from the
manifest. Hashing ~120 MB costs a fraction of a second; to skip it on every start, a
successful check leaves a stamp keyed on each file's inode, size, mtime and ctime (ctime
cannot be set back by ordinary programs), and any change to a file forces a full re-hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .embedder import EmbedderConfig
from .errors import BundleError

MANIFEST = "manifest.json"
STAMP = ".verified.json"
FORMAT = 1


@dataclass(frozen=True)
class LLMSpec:
    """The bundle's language model."""

    file: str
    architecture: str
    n_embd: int
    quantization: str
    chat_template: str | None


@dataclass(frozen=True)
class EmbedderSpec:
    """The bundle's sentence encoder."""

    file: str
    tokenizer: str
    int8: bool
    config: EmbedderConfig


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle."""

    path: Path
    name: str
    llm: LLMSpec
    embedder: EmbedderSpec
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def file_entries(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """sha256 and size of each named file, for a manifest's `files` section."""
    return {
        name: {"sha256": sha256_file(folder / name), "size": (folder / name).stat().st_size}
        for name in names
    }


def _parse(folder: Path, manifest: dict[str, Any]) -> Bundle:
    try:
        if manifest.get("format") != FORMAT:
            raise BundleError(
                f"The bundle {folder} has manifest format {manifest.get('format')!r}; this "
                f"edge-pllm reads format {FORMAT}. Rebuild it with `edge-pllm setup --rebuild`.",
                bundle=str(folder),
            )
        llm, emb = manifest["llm"], manifest["embedder"]
        return Bundle(
            path=folder,
            name=manifest.get("name", folder.name),
            llm=LLMSpec(
                file=llm["file"],
                architecture=llm["architecture"],
                n_embd=int(llm["n_embd"]),
                quantization=llm.get("quantization", "unknown"),
                chat_template=llm.get("chat_template"),
            ),
            embedder=EmbedderSpec(
                file=emb["file"],
                tokenizer=emb["tokenizer"],
                int8=bool(emb.get("int8", False)),
                config=EmbedderConfig(
                    dim=int(emb["dim"]),
                    pooling=emb.get("pooling", "mean"),
                    normalize=bool(emb.get("normalize", True)),
                    max_seq_length=int(emb.get("max_seq_length", 256)),
                ),
            ),
            manifest=manifest,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(
            f"The manifest of {folder} is incomplete or malformed ({exc!r}); rebuild the bundle.",
            bundle=str(folder),
            file=MANIFEST,
        ) from None


def load_bundle(folder: str | Path, verify: bool = True) -> Bundle:
    """Read and (by default) verify the bundle in `folder`."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(
            f"No bundle at {folder} (manifest.json is missing); build one with `edge-pllm setup`.",
            bundle=str(folder),
            file=MANIFEST,
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(
            f"The manifest of {folder} is not valid JSON ({exc}); rebuild the bundle.",
            bundle=str(folder),
            file=MANIFEST,
        ) from None
    if not isinstance(manifest, dict):
        raise BundleError(f"The manifest of {folder} is not a JSON object.", bundle=str(folder))
    bundle = _parse(folder, manifest)
    files = manifest.get("files") or {}
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and type(e.get("size")) is int
        for e in files.values()
    ):
        raise BundleError(
            f"The manifest of {folder} has a malformed 'files' section (each entry needs a "
            "sha256 and a size); rebuild the bundle.",
            bundle=str(folder),
            file=MANIFEST,
        )
    for name in files:
        _check_name(folder, name)
    for needed in _loaded_files(folder, bundle):
        if needed not in files:
            raise BundleError(
                f"The manifest of {folder} lists no checksum for {needed}; rebuild the bundle.",
                bundle=str(folder),
                file=needed,
            )
    if verify:
        verify_files(folder, files)
    return bundle


def _check_name(folder: Path, name: Any) -> str:
    """A file named by a manifest must be a relative path inside the bundle folder."""
    if (
        not isinstance(name, str)
        or not name
        or "\x00" in name
        or Path(name).is_absolute()
        or ".." in Path(name).parts
    ):
        raise BundleError(
            f"The manifest of {folder} names the file {name!r}, which is not a path inside "
            "the bundle; rebuild the bundle.",
            bundle=str(folder),
            file=str(name),
        )
    return name


def _loaded_files(folder: Path, bundle: Bundle) -> list[str]:
    """Every file the runtime will load from this bundle: each must have a checksum."""
    names = [bundle.llm.file, bundle.embedder.file, bundle.embedder.tokenizer]
    plug = bundle.manifest.get("plug")
    if plug:
        if not isinstance(plug, dict):
            raise BundleError(
                f"The manifest of {folder} has a malformed 'plug' section; rebuild the bundle.",
                bundle=str(folder),
                file=MANIFEST,
            )
        names.append(plug.get("file", "plug.onnx"))
        if plug.get("project_file"):
            names.append(plug["project_file"])
    return [_check_name(folder, name) for name in names]


def verify_files(folder: Path, files: dict[str, dict[str, Any]]) -> None:
    """Check each file's size and sha256; raise BundleError naming the first bad one."""
    stamp_path = folder / STAMP
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        stamp = {}
    fresh: dict[str, Any] = {}
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise BundleError(
                f"The bundle file {name} is missing from {folder}; rebuild the bundle with "
                "`edge-pllm setup --rebuild`.",
                bundle=str(folder),
                file=name,
            )
        fingerprint = _fingerprint(path)
        if stamp.get(name) == [entry["sha256"], *fingerprint]:
            fresh[name] = stamp[name]
            continue
        if fingerprint[1] != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise BundleError(
                f"The bundle file {name} in {folder} does not match its manifest checksum "
                "(changed or corrupt); rebuild the bundle with `edge-pllm setup --rebuild`.",
                bundle=str(folder),
                file=name,
            )
        fresh[name] = [entry["sha256"], *fingerprint]
    if fresh != stamp:
        try:
            tmp = stamp_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(fresh))
            os.replace(tmp, stamp_path)
        except OSError:
            pass  # a read-only bundle is verified in full each time
