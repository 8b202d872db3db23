"""The server never waits on the model where it need not: usage and finish reasons are the
generation's own, requests that need no model answer while it is busy, a client that left
stores nothing, OpenAI's `stream_options.include_usage` is answered, simonw's `llm` client
works in its default (streaming) mode, and `serve` says it serves only once it listens."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from edge_pllm import LLMConfig, PersonalLLM  # noqa: E402
from edge_pllm.server import ServerConfig  # noqa: E402

from .server_support import Raw, Running, free_port  # noqa: E402

MODEL = "edge-pllm/default"  # the default bundle's own LLM, as the server names it

BOB = ["Apple pie needs cinnamon.", "Sourdough starter: feed twice a day.", "Jam jars low."]


@pytest.fixture
def server(default_bundle: Path, tmp_path: Path) -> Iterator[tuple[Running, PersonalLLM]]:
    pllm = PersonalLLM(default_bundle, home=tmp_path, llm_config=LLMConfig(n_ctx=1024, n_threads=2))
    pllm.add("bob", BOB)
    config = ServerConfig(port=free_port(), default_user="bob")
    with Running(pllm, config) as running:
        yield running, pllm
    pllm.close()


def client(running: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=running.url, api_key="unused", max_retries=0, timeout=120)


def service(running: Running):
    return running.server.config.app.state.service


def wait_idle(running: Running, timeout: float = 120) -> None:
    """Until no request waits for the model or generates."""
    deadline = time.monotonic() + timeout
    while service(running).in_flight:
        assert time.monotonic() < deadline, "a generation never ended"
        time.sleep(0.05)


def ask(content: str, **extra) -> dict:
    return dict(model=MODEL, messages=[{"role": "user", "content": content}], user="bob", **extra)


def test_usage_and_finish_reason_are_the_generations_own(server):
    running, pllm = server
    c = client(running)
    for strategy in ("none", "rag:1"):
        cut = ask("Write a long story about bread.", max_tokens=5)
        cut["extra_body"] = {"edge_pllm": {"strategy": strategy}}
        told = c.chat.completions.create(**cut)
        prepared = pllm.prepare("bob", cut["messages"], strategy)
        assert told.choices[0].finish_reason == "length"
        assert told.usage.completion_tokens == 5
        assert told.usage.prompt_tokens == pllm.llm.count_tokens(prepared.prompt)
        assert told.usage.total_tokens == told.usage.prompt_tokens + 5

        streamed = list(
            c.chat.completions.create(**cut, stream=True, stream_options={"include_usage": True})
        )
        *chunks, last = streamed
        assert last.choices == [] and last.usage == told.usage  # OpenAI's usage chunk
        assert all(ch.usage is None for ch in chunks)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        assert text == told.choices[0].message.content
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason] == [
            "length"
        ]
    # Without stream_options, no usage chunk: the stream ends with the finishing chunk.
    plain = list(c.chat.completions.create(**ask("Say hi.", max_tokens=64), stream=True))
    assert plain[-1].choices[0].finish_reason in ("stop", "length")
    whole = c.completions.create(model=MODEL, prompt="Say hi.", user="bob", max_tokens=64)
    done = whole.choices[0].finish_reason
    assert (done == "length") == (whole.usage.completion_tokens >= 64)


def _send(port: int, path: str, body: dict) -> socket.socket:
    """A request sent on a raw socket, its answer never read (a client about to leave)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def test_requests_answer_while_the_model_is_busy_and_a_client_that_left_stores_nothing(server):
    running, pllm = server
    raw = Raw(running.url, timeout=30)
    left = {"plain": f"gone-{uuid.uuid4().hex[:6]}", "stream": f"gone-{uuid.uuid4().hex[:6]}"}
    stayed = f"stays-{uuid.uuid4().hex[:6]}"
    memory = {"strategy": "none", "remember": True}
    staying: dict[str, Raw.Reply] = {}
    # The runtime's model lock, held here as a request that generates holds it: every
    # generation below waits for it, everything else must not.
    with pllm._llm_lock:
        socks = [
            _send(
                running.config.port,
                "/v1/chat/completions",
                {
                    "messages": [{"role": "user", "content": f"Remember me, {kind}."}],
                    "user": user,
                    "max_tokens": 4,
                    "stream": kind == "stream",
                    "edge_pllm": memory,
                },
            )
            for kind, user in left.items()
        ]
        stay = threading.Thread(
            target=lambda: staying.update(
                reply=raw.post(
                    "/chat/completions",
                    json={
                        "messages": [{"role": "user", "content": "Remember me."}],
                        "user": stayed,
                        "max_tokens": 4,
                        "edge_pllm": memory,
                    },
                )
            )
        )
        stay.start()
        deadline = time.monotonic() + 30
        while service(running).in_flight < 3:  # all three are waiting for the model
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for path in ("/models", "/users/bob/history", "/users/bob/search?q=pie"):
            path, _, query = path.partition("?")
            params = dict([query.split("=")]) if query else None
            assert raw.get(path, params=params).status_code == 200, path
        for sock in socks:  # the two clients leave before their answers exist
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
    stay.join(timeout=120)
    assert staying["reply"].status_code == 200
    wait_idle(running)
    assert staying["reply"].json()["edge_pllm"]["memory"]["remembered"]
    assert [i.text for i in pllm.store.items(stayed)] == ["Remember me."]
    for user in left.values():
        assert not pllm.store.has_user(user), user  # nothing of a turn whose client left


def test_simonw_llm_client_streams_from_the_server(server, tmp_path: Path):
    pytest.importorskip("llm")
    running, _ = server
    home = tmp_path / "llm-home"
    home.mkdir()
    (home / "extra-openai-models.yaml").write_text(
        f"- model_id: edge\n  model_name: edge-pllm/default\n  api_base: {running.url}\n"
        "  api_key_name: edge\n"
    )
    (home / "keys.json").write_text(json.dumps({"edge": "unused"}))
    env = {**os.environ, "LLM_USER_PATH": str(home)}
    cmd = [sys.executable, "-m", "llm", "-m", "edge", "-o", "max_tokens", "8", "Say hi."]
    for extra in ([], ["--no-stream"]):  # its default (streaming with usage), and not
        done = subprocess.run(cmd + extra, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip(), done.stderr


def _serve(default_bundle: Path, port: int, home: Path) -> subprocess.Popen:
    where = ["--home", str(home), "--bundle", str(default_bundle), "--threads", "1"]
    return subprocess.Popen(
        [sys.executable, "-m", "edge_pllm", *where, "serve", "--port", str(port)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )


def test_serve_says_serving_once_it_listens_and_a_taken_port_is_one_sentence(
    default_bundle: Path, tmp_path: Path
):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve(default_bundle, port, tmp_path)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert f"Cannot serve on 127.0.0.1:{port}" in err and "--port" in err
    assert "Serving" not in err and "Traceback" not in err

    proc = _serve(default_bundle, 0, tmp_path)  # any free port: the line names the real one
    try:
        line = proc.stderr.readline()
        found = re.search(r"Serving \S+ on (http://127\.0\.0\.1:(\d+)/v1) ", line)
        assert found, line
        conn = http.client.HTTPConnection("127.0.0.1", int(found[2]), timeout=30)
        conn.request("GET", "/v1/models")  # listening by the time it says so
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
