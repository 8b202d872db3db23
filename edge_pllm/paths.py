"""Where edge-pllm keeps its files: one home directory, overridable by EDGE_PLLM_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

ENV_HOME = "EDGE_PLLM_HOME"


def home(override: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: `override`, else $EDGE_PLLM_HOME, else the platform's user data dir."""
    if override is not None:
        path = Path(override)
    elif os.environ.get(ENV_HOME):
        path = Path(os.environ[ENV_HOME])
    else:
        path = Path(platformdirs.user_data_dir("edge-pllm", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_path(home_dir: Path) -> Path:
    return home_dir / "history.db"


def bundles_dir(home_dir: Path) -> Path:
    return home_dir / "bundles"
