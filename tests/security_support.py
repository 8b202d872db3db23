"""Helpers for the security tests: a socket guard, an in-process ASGI client (no sockets at
all, and no httpx), and a memoizing wrapper around the real embedder."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote

import numpy as np


def _is_local(address: Any) -> bool:
    if isinstance(address, str | bytes):  # AF_UNIX path (or abstract socket)
        return True
    if not isinstance(address, tuple) or not address:
        return False
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


class NetworkGuard:
    """Every outbound socket operation to a non-loopback address (and every name lookup
    for a non-loopback name) is recorded and fails with an OSError before it happens."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, Any]] = []
        self.loopback = 0

    def check(self, what: str, address: Any) -> None:
        if _is_local(address):
            self.loopback += 1
            return
        self.attempts.append((what, address))
        raise OSError(f"network access attempted in a no-network test: {what} {address!r}")

    @contextmanager
    def active(self) -> Iterator[NetworkGuard]:
        guard = self
        real = {
            "connect": socket.socket.connect,
            "connect_ex": socket.socket.connect_ex,
            "sendto": socket.socket.sendto,
            "create_connection": socket.create_connection,
            "getaddrinfo": socket.getaddrinfo,
            "gethostbyname": socket.gethostbyname,
            "gethostbyname_ex": socket.gethostbyname_ex,
        }

        def connect(self: socket.socket, address: Any) -> Any:
            guard.check("connect", address)
            return real["connect"](self, address)

        def connect_ex(self: socket.socket, address: Any) -> Any:
            guard.check("connect_ex", address)
            return real["connect_ex"](self, address)

        def sendto(self: socket.socket, data: bytes, *args: Any) -> Any:
            guard.check("sendto", args[-1])
            return real["sendto"](self, data, *args)

        def create_connection(address: Any, *args: Any, **kwargs: Any) -> Any:
            guard.check("create_connection", address)
            return real["create_connection"](address, *args, **kwargs)

        def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            guard.check("getaddrinfo", (host, port))
            return real["getaddrinfo"](host, port, *args, **kwargs)

        def gethostbyname(host: str) -> Any:
            guard.check("gethostbyname", (host, 0))
            return real["gethostbyname"](host)

        def gethostbyname_ex(host: str) -> Any:
            guard.check("gethostbyname_ex", (host, 0))
            return real["gethostbyname_ex"](host)

        patches = {
            (socket.socket, "connect"): connect,
            (socket.socket, "connect_ex"): connect_ex,
            (socket.socket, "sendto"): sendto,
            (socket, "create_connection"): create_connection,
            (socket, "getaddrinfo"): getaddrinfo,
            (socket, "gethostbyname"): gethostbyname,
            (socket, "gethostbyname_ex"): gethostbyname_ex,
        }
        saved = {key: getattr(*key) for key in patches}
        for (owner, name), fn in patches.items():
            setattr(owner, name, fn)
        try:
            yield self
        finally:
            for (owner, name), fn in saved.items():
                setattr(owner, name, fn)


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status_code, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body)


def asgi_request(
    app: Any,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    json_body: Any = None,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> Reply:
    """One HTTP request straight into the ASGI app (no sockets, no client library)."""
    if json_body is not None:
        body = json.dumps(json_body).encode()
    body = body or b""
    raw_headers = [(b"content-type", b"application/json")]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    raw_headers.append((b"content-length", str(len(body)).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(path),  # ASGI servers pass the decoded path
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": query.encode(),
        "headers": raw_headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8400),
        "root_path": "",
    }
    sent = False
    status = 0
    out_headers: dict[str, str] = {}
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            out_headers.update({k.decode(): v.decode() for k, v in message.get("headers", [])})
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    asyncio.run(app(scope, receive, send))
    return Reply(status, out_headers, b"".join(chunks))


class CachedEmbedder:
    """The real embedder, memoized by text (queries repeat across property-test cases)."""

    def __init__(self, embedder: Any):
        self._embedder = embedder
        self._cache: dict[str, np.ndarray] = {}
        self.config = embedder.config

    @property
    def dim(self) -> int:
        return self._embedder.dim

    def embed_one(self, text: str) -> np.ndarray:
        if text not in self._cache:
            self._cache[text] = self._embedder.embed_one(text)
        return self._cache[text].copy()

    def embed(self, texts: Any, progress: Any = None, batch_size: Any = None) -> np.ndarray:
        return (
            np.stack([self.embed_one(t) for t in texts]) if len(texts) else self._embedder.embed([])
        )
