"""Model bundles: a folder with `manifest.json` and the files it names, verified on load.

A bundle is refused when a file is missing, or its size or sha256 differs from the
manifest. Hashing ~120 MB costs a fraction of a second; to skip it on every start, a
successful check leaves a stamp keyed on each file's inode, size, mtime and ctime (ctime
cannot be set back by ordinary programs), and any change to a file forces a full re-hash.

The Persona-Plug head (the manifest's `plug` entry, `PlugSpec`) is checked against the
bundle here too, in `check_plug`: it must have been trained for exactly the bundle's LLM and
embedder (by sha256), and map the embedder's width to the LLM's. A head that fails is not
a failed bundle: `Bundle.plug` is then None, `Bundle.plug_error` says why, and strategies
without the head keep working.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

from .embedder import EmbedderConfig
from .errors import BundleError
from .files import atomic_write

MANIFEST = "manifest.json"
STAMP = ".verified.json"
FORMAT = 1

HEAD_FILE = "plug.onnx"  # the head's aggregate graph (or, attached before the split, all of it)
PROJECT_FILE = "plug_project.onnx"  # Proj(h_i) per history item (export/plug_graph.py)
N_SOFT = 2  # soft tokens of heads whose entry predates `n_soft`: [instruction; persona]
MAX_HISTORY = 512  # history items a head reads when its entry does not say

InputEncoder = Literal["linear", "trainable"]
"""How the head reads the request: `linear`, the bundle embedder's vector through a learned
linear map; `trainable`, its own fine-tuned copy of the encoder over the request's tokens."""
Placement = Literal["prefix", "before_answer"]
"""Where the soft tokens go: `prefix`, in front of the whole prompt; `before_answer`, right
before the answer, after the templated request."""
INPUT_ENCODERS: tuple[str, ...] = get_args(InputEncoder)
PLACEMENTS: tuple[str, ...] = get_args(Placement)
# What heads exported before the option existed wrote in `input_encoder`.
_LEGACY_INPUT_ENCODERS = {"frozen encoder + learned linear map": "linear"}


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
class PlugSpec:
    """The bundle's Persona-Plug head: the manifest's `plug` entry, parsed and typed.

    `llm_sha256`, `embedder_sha256` (and, for the `trainable` input encoder,
    `tokenizer_sha256`) name the files the head was trained for. `extra` keeps every other
    key of the entry (training facts: task, steps, command, validation, ...) as written.
    """

    file: str
    d_enc: int
    d_llm: int
    llm_sha256: str
    embedder_sha256: str
    n_soft: int = N_SOFT
    max_history: int = MAX_HISTORY
    input_encoder: InputEncoder = "linear"
    project_file: str | None = None
    max_seq_length: int | None = None
    tokenizer_sha256: str | None = None
    placement: Placement = "prefix"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, folder: str | Path, entry: Any) -> PlugSpec:
        """Parse a `plug` entry of the manifest in `folder`; BundleError says what is wrong.
        Entries written before a key existed get its old meaning: no `file` is plug.onnx,
        no `n_soft` is 2, no `placement` is a prefix, the old `input_encoder` wording is
        `linear`."""
        folder = Path(folder)
        if not isinstance(entry, Mapping):
            raise BundleError(
                f"The manifest of {folder} has a malformed 'plug' section (not an object); "
                "rebuild the bundle or re-attach the head.",
                bundle=str(folder),
                file=MANIFEST,
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in entry.items() if k in known}
        extra = {k: v for k, v in entry.items() if k not in known}
        encoder = values.get("input_encoder", "linear")
        if isinstance(encoder, str):
            values["input_encoder"] = _LEGACY_INPUT_ENCODERS.get(encoder, encoder)
        values.setdefault("file", HEAD_FILE)
        for key in ("d_enc", "d_llm", "llm_sha256", "embedder_sha256"):
            if key not in values:
                _malformed(folder, key, "present", None)
        spec = cls(**values, extra=extra)
        spec._check_values(folder)
        return spec

    def to_manifest(self) -> dict[str, Any]:
        """The `plug` entry for a manifest: `from_manifest`'s inverse. Optional keys at
        their default (no project file, tokenizer or length; a prefix) are left out, as
        entries written before they existed lack them."""
        entry: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None or (f.name == "placement" and value == "prefix"):
                continue
            entry[f.name] = value
        return {**entry, **self.extra}

    def _check_values(self, folder: Path) -> None:
        optional = {"project_file", "tokenizer_sha256", "max_seq_length"}
        for key in ("file", "llm_sha256", "embedder_sha256", "project_file", "tokenizer_sha256"):
            value = getattr(self, key)
            if not (value is None and key in optional) and not (isinstance(value, str) and value):
                _malformed(folder, key, "a non-empty string", value)
        for key in ("d_enc", "d_llm", "n_soft", "max_history", "max_seq_length"):
            value = getattr(self, key)
            positive = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            if not (value is None and key in optional) and not positive:
                _malformed(folder, key, "a positive integer", value)
        if self.input_encoder not in INPUT_ENCODERS:
            raise BundleError(
                f"The Persona-Plug head in {folder} declares an unknown input encoder "
                f"{self.input_encoder!r} (this edge-pllm knows {', '.join(INPUT_ENCODERS)}); "
                "update edge-pllm or retrain the head.",
                bundle=str(folder),
                file=self.file,
            )
        if self.placement not in PLACEMENTS:
            raise BundleError(
                f"The Persona-Plug head in {folder} declares an unknown placement "
                f"{self.placement!r} for its soft tokens (this edge-pllm knows "
                f"{', '.join(PLACEMENTS)}); update edge-pllm or retrain the head.",
                bundle=str(folder),
                file=self.file,
            )
        for name in (self.file, self.project_file):
            if name is not None:
                _check_name(folder, name)


def _malformed(folder: Path, key: str, wanted: str, value: Any) -> None:
    raise BundleError(
        f"The Persona-Plug head in {folder} has a malformed manifest entry: {key} must be "
        f"{wanted} (got {value!r}); retrain the head for this bundle or rebuild the bundle.",
        bundle=str(folder),
        file=MANIFEST,
    )


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle.

    `plug` is the Persona-Plug head when the bundle has one that fits it (see
    `check_plug`); when the manifest names a head that does not, `plug` is None and
    `plug_error` says why. `require_plug()` gives the head or raises that error."""

    path: Path
    name: str
    llm: LLMSpec
    embedder: EmbedderSpec
    manifest: dict[str, Any]
    plug: PlugSpec | None = None
    plug_error: BundleError | None = None

    def file(self, name: str) -> Path:
        """The path of the bundle file `name`."""
        return self.path / name

    def require_plug(self) -> PlugSpec:
        """The Persona-Plug head's spec; BundleError when the bundle has none it can use."""
        if self.plug is not None:
            return self.plug
        if self.plug_error is not None:
            raise self.plug_error.with_traceback(None)
        raise BundleError(
            f"The bundle {self.path} has no Persona-Plug head; train one with "
            "`edge-pllm train-plug` or use a strategy without `plug`.",
            bundle=str(self.path),
        )


def check_plug(bundle: Bundle, spec: PlugSpec) -> None:
    """Raise BundleError unless the head `spec` was trained for `bundle`: the sha256 of its
    LLM, embedder and (for the `trainable` input encoder, which tokenizes the request
    itself) tokenizer equal the bundle's, and it maps the embedder's width to the LLM's."""
    files = bundle.manifest["files"]
    checked = [
        ("llm", spec.llm_sha256, bundle.llm.file),
        ("embedder", spec.embedder_sha256, bundle.embedder.file),
    ]
    if spec.input_encoder == "trainable":
        checked.append(("tokenizer", spec.tokenizer_sha256, bundle.embedder.tokenizer))
    for role, wanted, name in checked:
        if wanted != files[name]["sha256"]:
            raise BundleError(
                f"The Persona-Plug head in {bundle.path} was trained for another {role} "
                f"(sha256 {str(wanted)[:12]}…, the bundle's {name} is "
                f"{files[name]['sha256'][:12]}…); retrain the head for this bundle.",
                bundle=str(bundle.path),
                file=spec.file,
            )
    if spec.d_llm != bundle.llm.n_embd or spec.d_enc != bundle.embedder.config.dim:
        raise BundleError(
            f"The Persona-Plug head in {bundle.path} maps {spec.d_enc}→{spec.d_llm} but the "
            f"bundle needs {bundle.embedder.config.dim}→{bundle.llm.n_embd}; retrain the head "
            "for this bundle.",
            bundle=str(bundle.path),
            file=spec.file,
        )


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
        plug, plug_error = None, None
        if manifest.get("plug") not in (None, {}):  # null or {}: no head
            try:
                plug = PlugSpec.from_manifest(folder, manifest["plug"])
            except BundleError as exc:
                plug_error = exc
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
            plug=plug,
            plug_error=plug_error,
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
    if bundle.plug is not None:
        try:
            check_plug(bundle, bundle.plug)
        except BundleError as exc:
            bundle = replace(bundle, plug=None, plug_error=exc)
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
    if bundle.plug is not None:  # a head that does not parse is never loaded
        names += [n for n in (bundle.plug.file, bundle.plug.project_file) if n is not None]
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
        with contextlib.suppress(OSError):  # a read-only bundle is verified in full each time
            atomic_write(stamp_path, json.dumps(fresh))
