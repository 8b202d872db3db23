"""Models by reference: a GGUF the person already has, used in place of the bundle's LLM.

`edge-pllm models add PATH` registers a GGUF (an Ollama or LM Studio download, a file a
package ships): its sha256 is computed once, and then only its size and modification time
are re-checked, on every load. The file is never copied: the home keeps a hard link to it
where the file system allows (the model stays usable if the original is moved), else a
reference to its path; moving or changing the file is then one clear error
(`ModelChangedError`). A GGUF without a chat template is refused unless one is given.

A registered model answers with the default bundle's embedder; the bundle's Persona-Plug
head only with the model it was trained for (same sha256), so `plug` is offered only there
and every other strategy works with any model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import BundleError, InvalidInputError, ModelChangedError, UnknownModelError
from ..files import atomic_write, private_dir
from .bundle import Bundle, LLMSpec, sha256_file

MODELS_DIR = "models"
RECORD = "model.json"
LINK = "model.gguf"
ENV_MODEL = "EDGE_PLLM_MODEL"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # with fullmatch
MAX_TEMPLATE_CHARS = 100_000


@dataclass(frozen=True)
class ModelRecord:
    """A registered GGUF: where it is, what it was when registered, and what it holds."""

    name: str
    path: str  # the file as registered
    linked: bool  # the home holds a hard link to it (it survives the original's move)
    sha256: str
    size: int
    mtime_ns: int
    architecture: str
    quantization: str
    context_length: int
    n_embd: int
    chat_template: str | None  # the template given with --chat-template, if any
    gguf_template: bool  # whether the GGUF carries a template of its own
    added_at: str

    @property
    def template_source(self) -> str:
        return "given" if self.chat_template is not None else "gguf"


def models_dir(home: Path) -> Path:
    return home / MODELS_DIR


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInputError(
            f"A model name is lower-case letters, digits, '.', '_' or '-' (up to 64), not "
            f"{str(name)[:80]!r}; pass --name.",
            field="name",
        )
    return name


def default_name(path: Path) -> str:
    stem = re.sub(r"[^a-z0-9._-]+", "-", path.name.lower().removesuffix(".gguf")).strip("-._")
    return stem[:64] or "model"


def gguf_facts(path: Path) -> dict[str, Any]:
    """Architecture, quantization, context length, width and chat template from the GGUF's
    header and vocabulary (llama.cpp reads no weights for it)."""
    import llama_cpp

    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            llama = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    except ValueError as exc:
        raise BundleError(
            f"llama.cpp cannot read {path} as a GGUF model ({exc}).", file=str(path)
        ) from None
    meta = llama.metadata
    arch = meta.get("general.architecture", "unknown")
    types = {getattr(llama_cpp, n): n for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_")}
    file_type = meta.get("general.file_type")
    quant = types.get(int(file_type)) if file_type and file_type.isdigit() else None
    return {
        "architecture": arch,
        "quantization": quant.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_")
        if quant
        else "unknown",
        "context_length": int(meta.get(f"{arch}.context_length", "0") or 0),
        "n_embd": int(meta.get(f"{arch}.embedding_length", "0") or 0),
        "chat_template": meta.get("tokenizer.chat_template"),
    }


def add_model(
    home: Path,
    path: str | os.PathLike[str],
    name: str | None = None,
    chat_template: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> ModelRecord:
    """Register the GGUF at `path` under `name` (default: from its file name). A GGUF
    without a chat template needs `chat_template`; a name in use is refused."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise InvalidInputError(f"{path} is not a file.", field="path")
    name = check_name(name or default_name(file))
    folder = models_dir(home) / name
    if (folder / RECORD).exists():
        raise InvalidInputError(
            f"A model named {name!r} is registered already; remove it first "
            f"(`edge-pllm models remove {name}`) or pass another --name.",
            field="name",
        )
    if chat_template is not None and not (0 < len(chat_template) <= MAX_TEMPLATE_CHARS):
        raise InvalidInputError("The chat template is empty or too long.", field="chat_template")
    facts = gguf_facts(file)
    if facts["chat_template"] is None and chat_template is None:
        raise InvalidInputError(
            f"{file.name} has no chat template (a base model?): it would ramble; give one with "
            "--chat-template FILE (a Jinja template, as in a GGUF's tokenizer.chat_template).",
            field="chat_template",
        )
    stat = file.stat()
    digest = sha256_file(file, progress)
    private_dir(folder)
    (folder / LINK).unlink(missing_ok=True)  # left by an add that did not finish
    linked = True
    try:
        os.link(file, folder / LINK)
    except OSError:  # another file system, or links not allowed: a reference
        linked = False
    record = ModelRecord(
        name=name,
        path=str(file),
        linked=linked,
        sha256=digest,
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        architecture=facts["architecture"],
        quantization=facts["quantization"],
        context_length=facts["context_length"],
        n_embd=facts["n_embd"],
        chat_template=chat_template,
        gguf_template=facts["chat_template"] is not None,
        added_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    atomic_write(folder / RECORD, json.dumps(asdict(record), indent=1))
    return record


def _read(folder: Path) -> ModelRecord:
    try:
        data = json.loads((folder / RECORD).read_text())
        return ModelRecord(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(
            f"The record of model {folder.name!r} cannot be read ({exc}); remove it "
            f"(`edge-pllm models remove {folder.name}`) and add the file again.",
            file=str(folder / RECORD),
        ) from None


def list_models(home: Path) -> list[ModelRecord]:
    folder = models_dir(home)
    if not folder.is_dir():
        return []
    return [_read(f) for f in sorted(folder.iterdir()) if (f / RECORD).is_file()]


def get_model(home: Path, name: str) -> ModelRecord:
    folder = models_dir(home) / check_name(name)
    if not (folder / RECORD).is_file():
        known = [m.name for m in list_models(home)]
        raise UnknownModelError(name, known)
    return _read(folder)


def remove_model(home: Path, name: str) -> ModelRecord:
    """Unregister `name` (its hard link goes; the person's own file stays)."""
    record = get_model(home, name)
    folder = models_dir(home) / check_name(name)
    for child in (folder / LINK, folder / RECORD):
        child.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()
    return record


def model_file(home: Path, record: ModelRecord) -> Path:
    """The registered file, checked unchanged by size and modification time (no re-hash):
    the home's hard link, else the path it was registered from."""
    link = models_dir(home) / record.name / LINK
    file = link if record.linked and link.is_file() else Path(record.path)
    try:
        stat = file.stat()
    except OSError:
        raise ModelChangedError(record.name, record.path, "it is no longer there") from None
    if (stat.st_size, stat.st_mtime_ns) != (record.size, record.mtime_ns):
        raise ModelChangedError(record.name, str(file), "it changed since it was added")
    return file


def model_bundle(home: Path, record: ModelRecord, base: Bundle) -> Bundle:
    """`base` (its embedder) with the registered model as its LLM; its head only if it was
    trained for exactly this file (`Bundle.plug_error` says why not)."""
    file = model_file(home, record)
    template = record.chat_template
    llm = LLMSpec(str(file), record.architecture, record.n_embd, record.quantization, template)
    bundle = replace(base, name=record.name, llm=llm, plug=None, plug_error=None)
    head = base.plug
    if head is None:
        return bundle
    if head.llm_sha256 != record.sha256:
        return replace(
            bundle,
            plug_error=BundleError(
                f"The bundle's Persona-Plug head was trained for another model than "
                f"{record.name!r}; use none, recent or rag with it.",
                bundle=str(base.path),
            ),
        )
    return replace(bundle, plug=head)
