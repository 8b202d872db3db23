"""Running the app: uvicorn with a deadline for a request's headers, on a socket bound
before anything says the server runs."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from ..errors import AddressError, MissingDependencyError
from ..personal import PersonalLLM
from .app import create_app
from .settings import ServerConfig


def uvicorn_config(pllm: PersonalLLM, config: ServerConfig) -> Any:
    """The uvicorn settings `serve` runs with: the app, and HTTP/1.1 through h11 with a
    deadline for a request's headers (uvicorn by itself waits for them forever)."""
    try:
        import uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError as exc:
        raise MissingDependencyError("uvicorn", "server", "The server") from exc

    class HeaderDeadline(H11Protocol):
        """Closes a connection whose next request's headers are not complete within
        `read_timeout` seconds (a stalled or trickling client holds no socket for long)."""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._waiting_for = self.cycle  # a new cycle means the headers arrived
            self._deadline = self.loop.call_later(config.read_timeout, self._late)

        def _late(self) -> None:
            if self.cycle is self._waiting_for and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._deadline.cancel()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._deadline.cancel()
            super().connection_lost(exc)

    return uvicorn.Config(
        create_app(pllm, config),
        host=config.host,
        port=config.port,
        http=HeaderDeadline,
        log_level="warning",
    )


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` (port 0: any free port), or AddressError with the
    system's reason (a taken port is reported before anything says the server runs)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise AddressError(host, port, exc.strerror or str(exc)) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise AddressError(host, port, exc.strerror or str(exc)) from None
    sock.set_inheritable(True)
    return sock


def serve(
    pllm: PersonalLLM, config: ServerConfig, on_ready: Callable[[str], None] | None = None
) -> None:
    """Run the server until interrupted (Ctrl-C shuts it down cleanly); `on_ready` gets its
    URL once it accepts connections."""
    import uvicorn

    sock = listen(config.host, config.port)
    port = sock.getsockname()[1]
    host = f"[{config.host}]" if ":" in config.host else config.host

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and on_ready is not None:
                on_ready(f"http://{host}:{port}/v1")

    with sock:
        Server(uvicorn_config(pllm, config)).run(sockets=[sock])
