"""Where edge-pllm keeps its files: one home directory, overridable by EDGE_PLLM_HOME.

The home is owner-only (0o700): created so, and tightened (with a warning) if an earlier
release left it open to other accounts, so give it a folder of its own.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import platformdirs

from .files import private_dir, tighten

ENV_HOME = "EDGE_PLLM_HOME"


def home(override: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: `override`, else $EDGE_PLLM_HOME, else the platform's user data dir."""
    if override is not None:
        path = Path(override)
    elif os.environ.get(ENV_HOME):
        path = Path(os.environ[ENV_HOME])
    else:
        path = Path(platformdirs.user_data_dir("edge-pllm", appauthor=False))
    if path.is_dir():
        if _ours_to_tighten(path):
            tighten(path)
    else:
        private_dir(path)
    return path


def _ours_to_tighten(path: Path) -> bool:
    """A folder edge-pllm may make owner-only: not a shared one (sticky, like /tmp), nor the
    account's own home folder or one above it."""
    try:
        if os.stat(path).st_mode & stat.S_ISVTX:
            return False
        here, account = path.resolve(), Path.home().resolve()
    except (OSError, RuntimeError):  # RuntimeError: no home folder known
        return False
    return here != account and here not in account.parents


def database_path(home_dir: Path) -> Path:
    return home_dir / "history.db"


def bundles_dir(home_dir: Path) -> Path:
    return home_dir / "bundles"
