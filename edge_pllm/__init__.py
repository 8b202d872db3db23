"""edge-pllm: a personalized LLM that runs entirely on the user's own device."""

import os as _os
import sys as _sys
import warnings as _warnings

# onnxruntime (≥ 1.2x wheels, Linux included) ships Microsoft 1DS telemetry that, from a
# native thread, resolves and contacts mobile.events.data.microsoft.com. It reads this
# variable once, when onnxruntime is imported: set it before any import of onnxruntime.
# (`onnxruntime.disable_telemetry_events()` does not stop it.) See docs/SECURITY.md.
if "onnxruntime" in _sys.modules and _os.environ.get("ORT_DISABLE_TELEMETRY") != "1":
    _warnings.warn(
        "onnxruntime was imported before edge_pllm without ORT_DISABLE_TELEMETRY=1, so its "
        "telemetry stays on in this process; import edge_pllm first or set the variable.",
        RuntimeWarning,
        stacklevel=2,
    )
_os.environ["ORT_DISABLE_TELEMETRY"] = "1"

from .errors import (
    AnswerNotFoundError,
    BundleError,
    ContextOverflowError,
    EdgePLLMError,
    ExtensionLoadingError,
    InvalidInputError,
    ItemNotFoundError,
    MissingDependencyError,
    SoftTokenShapeError,
    StoreMismatchError,
    UnknownStrategyError,
    UnknownUserError,
)
from .inference.llm import LLMConfig, SamplingConfig
from .personal import PersonalLLM, Response
from .storage.items import HistoryItem, NewItem

__version__ = "0.1.0"

# Plugins written for the flat layout import these modules by their old names
# (`from edge_pllm import strategies`); they live in personalization/ now.
_MOVED = {"strategies": ".personalization.strategies", "prompts": ".personalization.prompts"}


def __getattr__(name: str) -> object:
    if name in _MOVED:
        import importlib

        return importlib.import_module(_MOVED[name], __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AnswerNotFoundError",
    "BundleError",
    "ContextOverflowError",
    "EdgePLLMError",
    "ExtensionLoadingError",
    "HistoryItem",
    "InvalidInputError",
    "ItemNotFoundError",
    "LLMConfig",
    "MissingDependencyError",
    "NewItem",
    "PersonalLLM",
    "Response",
    "SamplingConfig",
    "SoftTokenShapeError",
    "StoreMismatchError",
    "UnknownStrategyError",
    "UnknownUserError",
    "__version__",
]
