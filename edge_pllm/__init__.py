"""edge-pllm: a personalized LLM that runs entirely on the user's own device."""

from .errors import (
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
from .items import HistoryItem, NewItem
from .llm import LLMConfig, SamplingConfig
from .personal import PersonalLLM, Response

__version__ = "0.1.0"

__all__ = [
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
