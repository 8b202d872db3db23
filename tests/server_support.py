"""A real server on loopback for tests (uvicorn in a thread, configured as `serve` runs
it) and a plain HTTP client for requests no well-behaved client would send."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.parse

import uvicorn

from edge_pllm import PersonalLLM
from edge_pllm.server import ServerConfig, uvicorn_config


class Raw:
    """Plain HTTP on loopback (stdlib), for requests no well-behaved client would send."""

    class Reply:
        def __init__(self, status: int, text: str):
            self.status_code, self.text = status, text

        def json(self):
            return json.loads(self.text)

    def __init__(self, base_url: str, timeout: float = 60):
        parts = urllib.parse.urlsplit(base_url)
        self.host, self.port, self.prefix, self.timeout = (
            parts.hostname,
            parts.port,
            parts.path,
            timeout,
        )

    def request(self, method, path, content=None, json_body=None, params=None, headers=None):
        if json_body is not None:
            content = json.dumps(json_body).encode()
        url = self.prefix + path + ("?" + urllib.parse.urlencode(params) if params else "")
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            # The server may answer (413) and close before the whole body is sent, as it
            # should: its answer is then already in the socket, and is read below.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.request(
                    method,
                    url,
                    body=content,
                    headers={"content-type": "application/json", **(headers or {})},
                )
            reply = conn.getresponse()
            return Raw.Reply(reply.status, reply.read().decode())
        finally:
            conn.close()

    def get(self, path, params=None):
        return self.request("GET", path, params=params)

    def post(self, path, content=None, json=None, headers=None):
        return self.request("POST", path, content=content, json_body=json, headers=headers)

    def delete(self, path):
        return self.request("DELETE", path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, pllm: PersonalLLM, config: ServerConfig):
        self.config = config
        self.server = uvicorn.Server(uvicorn_config(pllm, config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "server did not shut down"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config.port}/v1"
