"""The ASGI app: routes, authentication, the URL check, and errors outside endpoints."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from ..errors import EdgePLLMError, InvalidInputError
from ..personal import PersonalLLM
from ._web import JSONResponse, Middleware, Request, Response, Route, Starlette
from .errors import HTTPError, error_body
from .service import Service
from .settings import ServerConfig, is_loopback


def check_url(scope: dict[str, Any]) -> None:
    """Refuse a URL whose path or query is not UTF-8 once percent-decoded: the server's
    framework would replace such bytes with U+FFFD, folding different byte strings into one
    user name or query. Decoded strictly here, once, before anything reads the URL."""
    raw = scope.get("raw_path")
    parts = [raw.split(b"?", 1)[0]] if raw is not None else []
    for pair in (scope.get("query_string") or b"").split(b"&"):
        parts.extend(pair.split(b"=", 1))
    try:
        if raw is None:  # only the decoded path: it must be text a strict codec accepts
            scope.get("path", "").encode("utf-8")
        for part in parts:
            unquote_to_bytes(part).decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise HTTPError(
            400,
            "The URL is not UTF-8 text once percent-decoded; encode names and queries as UTF-8.",
            "invalid_request_error",
        ) from None


class StrictURL:
    """ASGI middleware: every request's URL checked by `check_url` before routing, so a path
    that is not UTF-8 is a 400 whatever route it would have reached."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            try:
                check_url(scope)
            except HTTPError as exc:
                status, body = error_body(exc)
                await JSONResponse(body, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(pllm: PersonalLLM, config: ServerConfig | None = None) -> Starlette:
    """The ASGI app. Refuses to run without a key on a non-loopback address."""
    config = config or ServerConfig()
    if not is_loopback(config.host) and not config.api_key:
        raise InvalidInputError(
            f"Serving on {config.host} (not loopback) needs an API key: pass --api-key or set "
            "EDGE_PLLM_API_KEY.",
            field="api_key",
        )
    service = Service(pllm, config)

    def endpoint(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def wrapped(request: Request) -> Response:
            if config.api_key:
                given = request.headers.get("authorization", "")
                # Starlette decodes headers as Latin-1: compare the bytes that were sent with
                # the key's UTF-8 bytes, so a non-ASCII key works as a client sends it.
                expected = f"Bearer {config.api_key}".encode()
                if not secrets.compare_digest(given.encode("latin-1"), expected):
                    status, body = (
                        401,
                        {
                            "error": {
                                "message": "Missing or wrong API key.",
                                "type": "authentication_error",
                                "param": None,
                                "code": "invalid_api_key",
                            }
                        },
                    )
                    return JSONResponse(body, status_code=status)
            try:
                return await handler(request)
            except (EdgePLLMError, HTTPError) as exc:
                status, body = error_body(exc)
                # The rest of an oversized or stalled body is not read: end the connection.
                close = {"connection": "close"} if status in (408, 413) else None
                return JSONResponse(body, status_code=status, headers=close)
            except Exception as exc:  # a bug: a 500 with a plain body, the server stays up
                status, body = error_body(exc)
                return JSONResponse(body, status_code=status)

        return wrapped

    routes = [
        Route("/v1/models", endpoint(service.models), methods=["GET"]),
        Route(
            "/v1/chat/completions",
            endpoint(lambda r: service.complete(r, chat=True)),
            methods=["POST"],
        ),
        Route(
            "/v1/completions", endpoint(lambda r: service.complete(r, chat=False)), methods=["POST"]
        ),
        Route("/v1/users/{user}/history", endpoint(service.add_history), methods=["POST"]),
        Route("/v1/users/{user}/history", endpoint(service.list_history), methods=["GET"]),
        Route("/v1/users/{user}/search", endpoint(service.search), methods=["GET"]),
        Route("/v1/users/{user}/feedback", endpoint(service.feedback), methods=["POST"]),
        Route("/v1/users/{user}/history/{item}", endpoint(service.delete_item), methods=["DELETE"]),
        Route("/v1/users/{user}", endpoint(service.forget), methods=["DELETE"]),
        Route("/v1/users/{user}/export", endpoint(service.export), methods=["GET"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        # Unknown paths and methods get OpenAI-style JSON bodies too, not plain text.
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", None) or "Server error."
        type_ = "not_found_error" if status == 404 else "invalid_request_error"
        body = {"error": {"message": str(detail), "type": type_, "param": None, "code": None}}
        return JSONResponse(body, status_code=status)

    async def bug(request: Request, exc: Exception) -> Response:
        # Outside any endpoint (routing, middleware): still a JSON body, never plain text.
        status, body = error_body(exc)
        return JSONResponse(body, status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        service.close()

    app = Starlette(
        routes=routes,
        exception_handlers={404: http_error, 405: http_error, Exception: bug},
        middleware=[Middleware(StrictURL)],
        lifespan=lifespan,
    )
    # No redirect from `/v1/models/` to `/v1/models`: its Location would be built from the
    # client's Host header, before authentication.
    app.router.redirect_slashes = False
    app.state.service = service
    return app
