"""The server under load: how long requests that need no model wait while others generate,
and whether a streaming client that leaves mid-answer leaves its turn behind.

    .venv/bin/python -m benchmarks.serving            # also a section of `python -m benchmarks`
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edge_pllm import PersonalLLM, paths
from edge_pllm.defaults import ensure_default_bundle
from edge_pllm.inference.llm import LLMConfig
from edge_pllm.server import ServerConfig, listen, uvicorn_config

from .common import CHAT_PROMPT, Results, Row

TARGET_MS = 100.0


class _Server:
    """uvicorn in a thread, configured as `edge-pllm serve` runs it, on a free port."""

    def __init__(self, pllm: PersonalLLM):
        import uvicorn

        self.sock = listen("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        config = ServerConfig(port=self.port, default_user="bench", remember=False)
        self.server = uvicorn.Server(uvicorn_config(pllm, config))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> _Server:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, data, {"content-type": "application/json"})
            reply = conn.getresponse()
            return reply.status, reply.read()
        finally:
            conn.close()

    def leave_after_first_chunk(self, body: dict) -> None:
        """A streaming request whose client goes away once the answer has begun."""
        data = json.dumps({**body, "stream": True}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", "/v1/chat/completions", data, {"content-type": "application/json"})
        reply = conn.getresponse()
        reply.read(6)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()


def _timed(server: _Server, path: str) -> float:
    started = time.perf_counter()
    status, _ = server.request("GET", path)
    assert status == 200, (path, status)
    return (time.perf_counter() - started) * 1000


def under_load(
    res: Results, bundle: Path, threads: int, generating: int = 4, max_tokens: int = 64
) -> None:
    """Rows: the worst and median latency of `GET /v1/models` and of a history read while
    `generating` chat requests generate `max_tokens` each (the reference: the same GET on
    the idle server), and the turns stored for streaming clients that left mid-answer."""
    with tempfile.TemporaryDirectory(prefix="edge-pllm-serve-bench-") as tmp:
        pllm = PersonalLLM(bundle, home=tmp, llm_config=LLMConfig(n_threads=threads))
        pllm.add("bench", ["Tomatoes need full sun.", "Pruning roses in March."])
        with _Server(pllm) as server:
            asked = {
                "messages": [{"role": "user", "content": CHAT_PROMPT}],
                "max_tokens": max_tokens,
                "edge_pllm": {"strategy": "none"},
            }
            server.request("POST", "/v1/chat/completions", {**asked, "max_tokens": 1})  # loads
            idle = [_timed(server, "/v1/models") for _ in range(20)]
            busy: dict[str, list[float]] = {"/v1/models": [], "/v1/users/bench/history": []}
            leavers = [f"leaver-{i}" for i in range(2)]
            with ThreadPoolExecutor(generating + len(leavers)) as pool:
                answers = [
                    pool.submit(server.request, "POST", "/v1/chat/completions", asked)
                    for _ in range(generating)
                ]
                for user in leavers:
                    remembered = {"strategy": "none", "remember": True}
                    pool.submit(
                        server.leave_after_first_chunk,
                        {**asked, "user": user, "edge_pllm": remembered},
                    )
                while not all(a.done() for a in answers):
                    for path, times in busy.items():
                        times.append(_timed(server, path))
                    time.sleep(0.02)
            assert all(a.result()[0] == 200 for a in answers)
            while server.server.config.app.state.service.in_flight:
                time.sleep(0.05)
        stored = sum(len(pllm.store.items(u)) for u in leavers if pllm.store.has_user(u))
        pllm.close()
    reference = statistics.median(idle)
    for path, times in busy.items():
        res.add(
            Row(
                "serving",
                f"GET {path}, worst while {generating} requests generate",
                max(times),
                "ms",
                "the same GET on the idle server (median)",
                reference,
                f"≤ {TARGET_MS:g} ms",
                max(times) <= TARGET_MS,
                note=f"{len(times)} requests, median {statistics.median(times):.1f} ms",
            )
        )
    res.add(
        Row(
            "serving",
            f"turns stored for {len(leavers)} streaming clients that left mid-answer",
            stored,
            "turns",
            target="0",
            met=stored == 0,
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__)
    parser.add_argument("--bundle", type=Path, help="bundle folder (default: the default one)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--generating", type=int, default=4, help="requests generating at once")
    args = parser.parse_args(argv)
    bundle = args.bundle or ensure_default_bundle(paths.home())
    under_load(Results(), bundle, args.threads, args.generating)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
