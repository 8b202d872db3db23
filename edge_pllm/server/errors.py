"""Errors as OpenAI-style bodies, mapped from typed exceptions by type (never by message)."""

from __future__ import annotations

from typing import Any

from ..errors import (
    AddressError,
    AnswerNotFoundError,
    BundleError,
    ContextOverflowError,
    ExportError,
    ExtensionLoadingError,
    InvalidInputError,
    ItemNotFoundError,
    LLMError,
    MissingDependencyError,
    PassphraseError,
    SoftTokenShapeError,
    StoreMismatchError,
    UnknownModelError,
    UnknownStrategyError,
    UnknownUserError,
)


class HTTPError(Exception):
    """An error with its HTTP status and OpenAI-style type, raised by request handling."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None):
        self.status, self.message, self.type, self.param = status, message, type_, param
        super().__init__(message)


# Every error class of errors.py, by type (the first match wins: subclasses before their
# bases); tests/test_server.py checks that none is left to fall through to 500.
_STATUS: list[tuple[type[Exception], int, str]] = [
    (UnknownUserError, 404, "not_found_error"),
    (UnknownModelError, 404, "invalid_request_error"),
    (ItemNotFoundError, 404, "not_found_error"),
    (AnswerNotFoundError, 404, "not_found_error"),
    (ContextOverflowError, 400, "context_length_exceeded"),
    (UnknownStrategyError, 400, "invalid_request_error"),
    (SoftTokenShapeError, 400, "invalid_request_error"),
    (InvalidInputError, 400, "invalid_request_error"),
    (PassphraseError, 403, "permission_error"),
    (BundleError, 409, "model_error"),
    (StoreMismatchError, 409, "model_error"),
    (LLMError, 503, "model_error"),
    (ExportError, 503, "model_error"),
    (ExtensionLoadingError, 503, "service_unavailable_error"),
    (MissingDependencyError, 503, "service_unavailable_error"),
    (AddressError, 503, "service_unavailable_error"),
]


def status_of(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and OpenAI-style error type for `exc` (500, "server_error" for an
    exception edge-pllm does not raise on purpose: a bug)."""
    return next(((s, t) for cls, s, t in _STATUS if isinstance(exc, cls)), (500, "server_error"))


def error_body(exc: Exception) -> tuple[int, dict[str, Any]]:
    if isinstance(exc, HTTPError):
        status, type_, param = exc.status, exc.type, exc.param
    else:
        status, type_ = status_of(exc)
        param = getattr(exc, "field", None)
    body: dict[str, Any] = {"message": str(exc), "type": type_, "param": param, "code": None}
    if isinstance(exc, UnknownModelError):  # as OpenAI answers a model it does not have
        body["code"], body["param"] = "model_not_found", "model"
    if isinstance(exc, ContextOverflowError):
        body["code"] = "context_length_exceeded"
        body["details"] = {
            "prompt_tokens": exc.prompt_tokens,
            "max_tokens": exc.max_tokens,
            "n_ctx": exc.n_ctx,
        }
    return status, {"error": body}
