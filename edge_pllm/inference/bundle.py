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
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

from ..errors import BundleError, InvalidInputError
from ..files import atomic_write
from ..jsonio import parse_json
from ..storage.items import json_type
from .embedder import POOLINGS, EmbedderConfig

MANIFEST = "manifest.json"
STAMP = ".verified.json"
FORMAT = 1
# A head with a task adapter: an edge-pllm from before adapters would keep `adapter_file`
# as an unknown key and run the head without it. Written only for such a bundle, so that
# those refuse it; every other bundle stays readable by them.
ADAPTER_FORMAT = 2
FORMATS = (FORMAT, ADAPTER_FORMAT)

HEAD_FILE = "plug.onnx"  # the head's aggregate graph (or, attached before the split, all of it)
PROJECT_FILE = "plug_project.onnx"  # Proj(h_i) per history item (export/plug_graph.py)
# The population's history (the training users' mean history vector, (1, d_enc) float32
# .npy): the persona of a user with no history, and the prior of one with little.
POPULATION_FILE = "plug_population.npy"
# The head's task adapter: a GGUF LoRA that llama.cpp applies from the soft tokens on.
ADAPTER_FILE = "plug_adapter.gguf"
N_SOFT = 2  # soft tokens of heads whose entry predates `n_soft`: [instruction; persona]
MAX_HISTORY = 512  # history items a head reads when its entry does not say
# Bounds of the manifest's numbers: a value outside is a malformed manifest, refused on load
# (a width of 0 or a negative length would otherwise fail later, deep in sqlite-vec or a model).
MAX_WIDTH = 65_536  # embedder dim, LLM n_embd, a head's d_enc and d_llm
MAX_SEQ_LENGTH = 100_000  # tokens an encoder reads
MAX_BATCH = 4_096  # texts an embedder runs at once
MAX_SOFT_TOKENS = 1_024  # soft tokens a head writes
MAX_HISTORY_ITEMS = 100_000  # history items a head reads

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
    population_file: str | None = None
    adapter_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[str]:
        """Every file of the head, as named in the bundle."""
        names = (self.file, self.project_file, self.population_file, self.adapter_file)
        return [n for n in names if n is not None]

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
        optional = {
            "project_file", "tokenizer_sha256", "max_seq_length", "population_file", "adapter_file"
        }  # fmt: skip
        texts = ("file", "llm_sha256", "embedder_sha256", "project_file", "tokenizer_sha256")
        for key in (*texts, "population_file", "adapter_file"):
            value = getattr(self, key)
            if not (value is None and key in optional) and not (_is_text(value) and value):
                _malformed(folder, key, "a non-empty string", value)
        bounds = {
            "d_enc": MAX_WIDTH,
            "d_llm": MAX_WIDTH,
            "n_soft": MAX_SOFT_TOKENS,
            "max_history": MAX_HISTORY_ITEMS,
            "max_seq_length": MAX_SEQ_LENGTH,
        }
        for key, high in bounds.items():
            value = getattr(self, key)
            accepts, wanted = _positive_int(high)
            if not (value is None and key in optional) and not accepts(value):
                _malformed(folder, key, wanted, value)
        if self.input_encoder not in INPUT_ENCODERS:
            raise BundleError(
                f"The Persona-Plug head in {folder} declares an unknown input encoder "
                f"{_shown(self.input_encoder)} (this edge-pllm knows {', '.join(INPUT_ENCODERS)}); "
                "update edge-pllm or retrain the head.",
                bundle=str(folder),
                file=self.file,
            )
        if self.placement not in PLACEMENTS:
            raise BundleError(
                f"The Persona-Plug head in {folder} declares an unknown placement "
                f"{_shown(self.placement)} for its soft tokens (this edge-pllm knows "
                f"{', '.join(PLACEMENTS)}); update edge-pllm or retrain the head.",
                bundle=str(folder),
                file=self.file,
            )
        if self.adapter_file is not None and self.placement != "before_answer":
            _malformed(folder, "placement", "before_answer with an adapter_file", self.placement)
        for name in self.files:
            _check_name(folder, name)


def _malformed(folder: Path, key: str, wanted: str, value: Any) -> None:
    raise BundleError(
        f"The Persona-Plug head in {folder} has a malformed manifest entry: {key} must be "
        f"{wanted} (got {_shown(value)}); retrain the head for this bundle or rebuild the bundle.",
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


_MISSING: Any = object()
SHA256 = re.compile(r"[0-9a-f]{64}")  # always with fullmatch


def _positive_int(high: int) -> tuple[Callable[[Any], bool], str]:
    """A check (and its wording) for an integer from 1 to `high` (not a bool)."""
    return (lambda v: type(v) is int and 1 <= v <= high, f"a positive integer (at most {high:,})")


def _is_text(value: Any) -> bool:
    """A string that is valid Unicode (no lone surrogates, which JSON's \\u escapes allow
    but no terminal or file system encoding can write)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_TEXT = (lambda v: _is_text(v) and bool(v), "a non-empty string")
_BOOL = (lambda v: isinstance(v, bool), "true or false")


def _field(
    folder: Path,
    section: Mapping[str, Any],
    where: str,
    key: str,
    check: tuple[Callable[[Any], bool], str],
    default: Any = _MISSING,
) -> Any:
    """The value of `key` in the manifest's `where` section, if `check` accepts it (absent:
    `default`, when there is one); else a BundleError naming the field and what it must be."""
    label = f"{where}.{key}" if where else key
    if key not in section:
        if default is _MISSING:
            raise BundleError(
                f"The manifest of {folder} is incomplete or malformed: {label} is missing; "
                "rebuild the bundle.",
                bundle=str(folder),
                file=MANIFEST,
            )
        return default
    value = section[key]
    accepts, wanted = check
    if not accepts(value):
        raise BundleError(
            f"The manifest of {folder} is incomplete or malformed: {label} must be {wanted} "
            f"(got {_shown(value)}); rebuild the bundle.",
            bundle=str(folder),
            file=MANIFEST,
        )
    return value


def _file_field(folder: Path, section: Mapping[str, Any], where: str, key: str) -> str:
    """A file name of the manifest: present, and a relative path inside the bundle."""
    return _check_name(folder, _field(folder, section, where, key, (lambda v: True, "")))


def _shown(value: Any) -> str:
    """A value as a message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _section(folder: Path, manifest: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    return _field(folder, manifest, "", key, (_is_object, "an object"))


def manifest_format(plug: PlugSpec | None) -> int:
    """The format a bundle with head `plug` is written as: the oldest that runs it right."""
    return ADAPTER_FORMAT if plug is not None and plug.adapter_file is not None else FORMAT


def _is_object(value: Any) -> bool:
    return isinstance(value, Mapping)


def _parse(folder: Path, manifest: dict[str, Any]) -> Bundle:
    """The bundle that `manifest` describes. Every field is checked for its type and bounds
    here (a width of 0, a negative length or a string where a number goes is a BundleError
    naming the field), before anything is built or loaded from it."""
    fmt = manifest.get("format")
    if type(fmt) is not int or fmt not in FORMATS:
        newer = type(fmt) is int and fmt > max(FORMATS)
        raise BundleError(
            f"The bundle {folder} has manifest format {_shown(fmt)}; this edge-pllm reads "
            f"formats {FORMAT} and {ADAPTER_FORMAT}. "
            + (
                "A newer edge-pllm wrote it: upgrade edge-pllm to use it."
                if newer
                else "Rebuild it with `edge-pllm setup --rebuild`."
            ),
            bundle=str(folder),
        )
    name = _field(folder, manifest, "", "name", _TEXT, folder.name)
    llm, emb = _section(folder, manifest, "llm"), _section(folder, manifest, "embedder")
    plug, plug_error = None, None
    if manifest.get("plug") not in (None, {}):  # null or {}: no head
        try:
            plug = PlugSpec.from_manifest(folder, manifest["plug"])
        except BundleError as exc:
            plug_error = exc
    optional_text = (lambda v: v is None or _is_text(v), "a string or null")
    return Bundle(
        path=folder,
        name=name,
        llm=LLMSpec(
            file=_file_field(folder, llm, "llm", "file"),
            architecture=_field(folder, llm, "llm", "architecture", _TEXT),
            n_embd=_field(folder, llm, "llm", "n_embd", _positive_int(MAX_WIDTH)),
            quantization=_field(folder, llm, "llm", "quantization", _TEXT, "unknown"),
            chat_template=_field(folder, llm, "llm", "chat_template", optional_text, None),
        ),
        embedder=EmbedderSpec(
            file=_file_field(folder, emb, "embedder", "file"),
            tokenizer=_file_field(folder, emb, "embedder", "tokenizer"),
            int8=_field(folder, emb, "embedder", "int8", _BOOL, False),
            config=EmbedderConfig(
                dim=_field(folder, emb, "embedder", "dim", _positive_int(MAX_WIDTH)),
                pooling=_field(
                    folder,
                    emb,
                    "embedder",
                    "pooling",
                    (lambda v: v in POOLINGS, f"one of {', '.join(POOLINGS)}"),
                    "mean",
                ),
                normalize=_field(folder, emb, "embedder", "normalize", _BOOL, True),
                max_seq_length=_field(
                    folder, emb, "embedder", "max_seq_length", _positive_int(MAX_SEQ_LENGTH), 256
                ),
                **_batching(folder, emb),
            ),
        ),
        manifest=manifest,
        plug=plug,
        plug_error=plug_error,
    )


def _batching(folder: Path, emb: Mapping[str, Any]) -> dict[str, Any]:
    """`batch_invariant` and the ingest `batch_size` of the manifest's embedder entry. Only
    a model whose vectors do not depend on the batch may batch: an entry without
    `batch_invariant: true` (every bundle made before the field) embeds one text per run."""
    invariant = _field(folder, emb, "embedder", "batch_invariant", _BOOL, False)
    size = _field(
        folder,
        emb,
        "embedder",
        "batch_size",
        (
            lambda v: _positive_int(MAX_BATCH)[0](v) and (invariant or v == 1),
            f"a positive integer (at most {MAX_BATCH:,}), and 1 unless batch_invariant is true",
        ),
        1,
    )
    return {"batch_invariant": invariant, "batch_size": size}


def _files_section(folder: Path, manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's `files` section: each entry a sha256 (64 hex digits) and a size."""
    files = manifest.get("files") or {}
    if not isinstance(files, dict) or not all(
        isinstance(e, dict)
        and isinstance(e.get("sha256"), str)
        and SHA256.fullmatch(e["sha256"]) is not None
        and type(e.get("size")) is int
        and e["size"] >= 0
        for e in files.values()
    ):
        raise BundleError(
            f"The manifest of {folder} has a malformed 'files' section (each entry needs a "
            "sha256 and a size); rebuild the bundle.",
            bundle=str(folder),
            file=MANIFEST,
        )
    return files


def _read_manifest(folder: Path) -> dict[str, Any]:
    """The parsed manifest of `folder` (`jsonio.parse_json`: bounded numbers and nesting),
    or a BundleError: missing, a symbolic link, unreadable, not JSON, not an object."""
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(
            f"No bundle at {folder} (manifest.json is missing); build one with `edge-pllm setup`.",
            bundle=str(folder),
            file=MANIFEST,
        )
    _check_inside(folder, MANIFEST)
    try:
        manifest = parse_json(path.read_bytes(), f"The manifest of {folder}")
    except InvalidInputError as exc:
        raise BundleError(
            f"{str(exc).removesuffix('.')}; rebuild the bundle.", bundle=str(folder), file=MANIFEST
        ) from None
    except OSError as exc:
        raise BundleError(
            f"The manifest of {folder} cannot be read ({exc.strerror or exc}).",
            bundle=str(folder),
            file=MANIFEST,
        ) from None
    if not isinstance(manifest, dict):
        raise BundleError(
            f"The manifest of {folder} is a JSON {json_type(manifest)}, not an object; rebuild "
            "the bundle.",
            bundle=str(folder),
            file=MANIFEST,
        )
    return manifest


def load_bundle(folder: str | Path, verify: bool = True) -> Bundle:
    """Read and (by default) verify the bundle in `folder`."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    bundle = _parse(folder, manifest)
    files = _files_section(folder, manifest)
    for name in files:
        _check_name(folder, name)
        _check_inside(folder, name)
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
        not _is_text(name)
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


def _check_inside(folder: Path, name: str) -> None:
    """A bundle file must be the bundle's own: not a symbolic link, and (through any linked
    folder on its way) not resolving to a place outside the bundle folder. Hard links and
    copies are the bundle's own files; a link could be pointed elsewhere after the check."""
    path = folder / name
    try:
        refused = path.is_symlink() or (
            path.exists() and not path.resolve().is_relative_to(folder.resolve())
        )
    except (OSError, RuntimeError):  # a link loop, a name too long, ...
        refused = True
    if refused:
        raise BundleError(
            f"The bundle file {name} in {folder} is a symbolic link or lies outside the bundle "
            "folder; a bundle must hold its files itself (copies or hard links): rebuild the "
            "bundle.",
            bundle=str(folder),
            file=name,
        )


def _loaded_files(folder: Path, bundle: Bundle) -> list[str]:
    """Every file the runtime will load from this bundle: each must have a checksum."""
    names = [bundle.llm.file, bundle.embedder.file, bundle.embedder.tokenizer]
    if bundle.plug is not None:  # a head that does not parse is never loaded
        names += bundle.plug.files
    return [_check_name(folder, name) for name in names]


def verify_files(folder: Path, files: dict[str, dict[str, Any]]) -> None:
    """Check each file's size and sha256; raise BundleError naming the first bad one."""
    stamp_path = folder / STAMP
    try:  # any stamp that cannot be used is as good as none: every file is hashed
        stamp = parse_json(stamp_path.read_bytes(), f"The verification stamp of {folder}")
    except (OSError, InvalidInputError):
        stamp = {}
    if not isinstance(stamp, dict):
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
        if fingerprint[1] == entry["size"] and stamp.get(name) == [entry["sha256"], *fingerprint]:
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
