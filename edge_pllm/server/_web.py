"""Starlette, imported once for the server's modules: without the [server] extra, one
sentence that names it."""

from ..errors import MissingDependencyError

try:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("starlette", "server", "The server") from exc

__all__ = [
    "JSONResponse",
    "Middleware",
    "Request",
    "Response",
    "Route",
    "Starlette",
    "StreamingResponse",
]
