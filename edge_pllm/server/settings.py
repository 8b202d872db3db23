"""The server's settings: one `ServerConfig` that `serve`'s options fill."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..personal import DEFAULT_STRATEGY

DEFAULT_PORT = 8400
GENERATION_THREADS = 64  # requests waiting for the model at once; more queue behind them


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    default_strategy: str = DEFAULT_STRATEGY
    default_user: str | None = None  # for clients that cannot send `user`
    max_body_bytes: int = 1_000_000
    max_tokens_limit: int = 1024
    read_timeout: float = 30.0  # seconds a client may stall while sending a body
    body_timeout: float = 60.0  # seconds a whole body may take, however it trickles
    remember: bool = False  # memory for requests that do not say (edge_pllm.remember)
    max_loaded: int = 1  # models kept in memory at once (the least recently used goes)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
