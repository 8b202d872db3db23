"""The server's boundary, by class of defect (issue 19): every value that crosses it is
parsed and bounded by one schema, failures anywhere (routing included) are typed 4xx JSON
bodies, user names are compared exactly and never folded, a first conversation is not an
error, unsupported OpenAI fields are refused, and bodies are bounded while they are read.

The reviewer's reproducers are regression tests; hypothesis then throws the whole class at
every endpoint: numbers of any size and script, nesting of any depth, every role's text
with unpaired surrogates, dates at the edges, names with every kind of invisible character.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("starlette", reason="the server needs the [server] extra")
pytest.importorskip("pydantic", reason="the server needs the [server] extra")
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_pllm import LLMConfig, PersonalLLM
from edge_pllm.server import ServerConfig, create_app

from .security_support import asgi_request

MODEL = "edge-pllm/default"  # the default bundle's own LLM, as the server names it

SETTINGS = dict(
    deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


SEEDED = {"fix(parser): handle blank lines", "docs: explain the cache", "dave's note"}


@pytest.fixture
def app(pllm: PersonalLLM):
    pllm.add("alice", ["fix(parser): handle blank lines", "docs: explain the cache"])
    pllm.add("dave", ["dave's note"])
    return create_app(pllm, ServerConfig(max_tokens_limit=2, max_body_bytes=200_000))


def snapshot(pllm: PersonalLLM) -> list[tuple[str, int]]:
    return [(u.name, u.items) for u in pllm.store.users()]


def refused(reply, status: int = 400) -> dict:
    assert reply.status_code == status, (reply.status_code, reply.text[:300])
    error = reply.json()["error"]
    assert error["message"] and error["type"]
    return error


def raw_chat(extra: str) -> bytes:
    return (
        '{"user": "alice", "messages": [{"role": "user", "content": "hi"}]' + extra + "}"
    ).encode()


# --- the reported reproducers --------------------------------------------------------------


def test_odd_but_well_formed_numbers_and_nesting_are_400s(app, pllm):
    before = snapshot(pllm)
    cases = {
        "5,000-digit max_tokens": raw_chat(', "max_tokens": ' + "9" * 5000),
        "400-digit temperature": raw_chat(', "temperature": ' + "9" * 400),
        "1e400 temperature": raw_chat(', "temperature": 1e400'),
        "NaN top_p": raw_chat(', "top_p": NaN'),
        "50,000-deep nesting": b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        "surrogate in a system turn": b'{"user": "alice", "messages": [{"role": "system", '
        b'"content": "\\ud800"}, {"role": "user", "content": "hi"}]}',
        "surrogate in an assistant turn": b'{"user": "alice", "messages": [{"role": "user", '
        b'"content": "hi"}, {"role": "assistant", "content": "x\\udfff"}, '
        b'{"role": "user", "content": "hi"}]}',
    }
    for name, body in cases.items():
        error = refused(asgi_request(app, "POST", CHAT, body))
        assert error["type"] == "invalid_request_error", name
    history = "/v1/users/alice/history"
    for created in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"):
        refused(asgi_request(app, "POST", history, json_body={"text": "x", "created_at": created}))
    refused(asgi_request(app, "GET", history, query="limit=%C2%B2"))
    refused(asgi_request(app, "GET", "/v1/users/alice/search", query="q=x&k=%D9%A3"))
    error = refused(asgi_request(app, "DELETE", f"{history}/{'9' * 5000}"))
    assert error["param"] == "item"
    assert snapshot(pllm) == before


def test_names_are_compared_exactly_never_folded(app, pllm):
    before = snapshot(pllm)
    for name in ("alice\x1f", " alice", "alice\u3000", "\u200balice", "a/b", "alice\t"):
        for method, path in (
            ("GET", f"/v1/users/{quote(name, safe='')}/history"),
            ("DELETE", f"/v1/users/{quote(name, safe='')}"),
        ):
            reply = asgi_request(app, method, path)
            assert reply.status_code in (400, 404), (name, reply.status_code)
            assert "alice" not in {i.get("text") for i in reply.json().get("items", [])}
        reply = asgi_request(app, "POST", CHAT, json_body={"user": name, "messages": HI})
        refused(reply)
    refused(asgi_request(app, "DELETE", "/v1/users/%E3%80%80dave"))
    assert snapshot(pllm) == before  # dave and alice are both still there


def test_a_brand_new_user_gets_the_plain_prompt(app, pllm):
    for strategy in ("none", "recent", "rag", "plug-own", "plug", "plug+rag"):
        body = {"user": "newcomer", "messages": HI, "edge_pllm": {"strategy": strategy}}
        reply = asgi_request(app, "POST", CHAT, json_body=body)
        assert reply.status_code == 200, reply.text
        ext = reply.json()["edge_pllm"]
        assert ext["context_ids"] == []
        # plug gives a newcomer the population persona the head ships, the others nothing
        population = strategy in ("plug", "plug+rag")
        assert ext["soft_tokens"] == (pllm.plug.n_soft if population else 0)
        if strategy != "none":  # none is the plain prompt for everyone: no fallback to say
            said = ext["fallback"]
            assert said.endswith("population persona" if population else "plain prompt")
    assert not pllm.store.has_user("newcomer")


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("max_completion_tokens", 0),
        ("n", 2),
        ("logprobs", True),
        ("top_logprobs", 3),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
        ("response_format", {"type": "json_object"}),
        ("presence_penalty", 0.5),
        ("seed", -1),
        ("seed", 2**31),
        ("seed", 1.5),
        ("seed", True),
        ("max_tokens", "8"),
        ("temperature", True),
        ("stream", "yes"),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("made_up_field", 1),
    ],
)
def test_unsupported_or_out_of_range_fields_are_refused(app, field, value):
    body = {"user": "alice", "messages": HI, field: value}
    error = refused(asgi_request(app, "POST", CHAT, json_body=body))
    assert error["param"].split(".")[0] == field, error
    assert field in error["message"]


def test_what_openai_clients_send_by_default_is_accepted(app):
    body = {
        "model": MODEL,
        "user": "alice",
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            *HI,
        ],
        "n": 1,
        "logprobs": False,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "response_format": {"type": "text"},
        "max_completion_tokens": 2,
        "stream": False,
    }
    reply = asgi_request(app, "POST", CHAT, json_body=body)
    assert reply.status_code == 200, reply.text
    completion = {"model": MODEL, "user": "alice", "prompt": ["hi"], "echo": False, "best_of": 1}
    assert asgi_request(app, "POST", "/v1/completions", json_body=completion).status_code == 200


def test_no_redirect_built_from_the_host_header(app):
    reply = asgi_request(app, "GET", "/v1/models/", headers={"host": "evil.example"})
    assert reply.status_code == 404 and "location" not in reply.headers


def test_a_non_ascii_api_key_works_as_clients_send_it(pllm):
    key = "clé-ключ-🔑"
    app = create_app(pllm, ServerConfig(api_key=key))
    # Clients send header values as UTF-8 bytes; asgi_request encodes them so.
    ok = asgi_request(app, "GET", "/v1/models", headers={"authorization": f"Bearer {key}"})
    assert ok.status_code == 200
    wrong = asgi_request(app, "GET", "/v1/models", headers={"authorization": "Bearer cle"})
    assert wrong.status_code == 401


# --- the classes, fuzzed -----------------------------------------------------------------

# A JSON value as raw text, so that what json.dumps cannot write (huge numbers, unpaired
# surrogate escapes, absurd nesting) reaches the server as a client could send it.
HOSTILE_VALUE = st.one_of(
    st.integers(1, 6000).map(lambda n: "9" * n),
    st.integers(1, 6000).map(lambda n: "-" + "1" * n),
    st.sampled_from(["1e400", "-1e400", "1e-400", "NaN", "Infinity", "0", "-0", "1.5", "2"]),
    st.integers(1, 60_000).map(lambda d: "[" * d + "]" * d),
    st.integers(1, 60_000).map(lambda d: '{"a":' * d + "1" + "}" * d),
    st.sampled_from(['"\\ud800"', '"x\\udfff"', '"\\u0000"', '""', '" "', '"\\u3000"']),
    st.sampled_from(
        [
            '"9999-12-31T23:59:59-14:00"',
            '"0001-01-01T00:00:00+14:00"',
            '"9999-12-31"',
            '"0000-01-01"',
            '"2024-02-30"',
        ]
    ),
    st.sampled_from(["true", "false", "null", "[]", "{}", '"text"', '["a"]', '{"type":"x"}']),
)
GENERATION_FIELDS = [
    "max_tokens",
    "seed",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "user",
    "n",
    "logprobs",
    "tools",
    "response_format",
    "edge_pllm",
    "model",
]


def hostile_request(draw_route: str, field: str, value: str, role: str) -> tuple[str, bytes]:
    if draw_route == "chat":
        return CHAT, raw_chat(f', "{field}": {value}')
    if draw_route == "role":  # the value as the text of a turn of any role
        turns = f'[{{"role": "{role}", "content": {value}}}, {{"role": "user", "content": "hi"}}]'
        return CHAT, f'{{"user": "alice", "messages": {turns}}}'.encode()
    if draw_route == "completion":
        return "/v1/completions", f'{{"user": "alice", "prompt": {value}}}'.encode()
    item_field = field if field in ("text", "kind", "created_at", "metadata") else "created_at"
    return "/v1/users/alice/history", f'{{"text": "x", "{item_field}": {value}}}'.encode()


def run_hostile_fuzz(app, pllm: PersonalLLM, examples: int) -> dict[str, int]:
    seen: dict[str, int] = {}
    before = snapshot(pllm)

    @settings(max_examples=examples, **SETTINGS)
    @given(
        route=st.sampled_from(["chat", "role", "completion", "history"]),
        field=st.sampled_from([*GENERATION_FIELDS, "text", "kind", "created_at", "metadata"]),
        value=HOSTILE_VALUE,
        role=st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
    )
    def prop(route, field, value, role):
        path, body = hostile_request(route, field, value, role)
        reply = asgi_request(app, "POST", path, body)
        seen[str(reply.status_code)] = seen.get(str(reply.status_code), 0) + 1
        assert reply.status_code < 500, (path, body[:200], reply.text[:300])
        if reply.status_code >= 400:
            refused(reply, reply.status_code)
        if path.startswith("/v1/users") and reply.status_code == 201:
            pllm.delete("alice", reply.json()["ids"])  # keep the store as it was

    prop()
    assert snapshot(pllm) == before
    return seen


def run_boundary_fuzz(app, pllm: PersonalLLM, examples: int) -> dict[str, int]:
    """Paths and query parameters: names with any invisible character next to a real
    user's name, item ids and counts of any length and any script's digits."""
    seen: dict[str, int] = {}
    before = snapshot(pllm)
    odd = st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"]) | st.sampled_from("/\\.%")
    digits = st.text(st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=6)

    @settings(max_examples=examples, **SETTINGS)
    @given(
        name=st.tuples(st.sampled_from(["alice", "dave"]), odd, st.booleans()).map(
            lambda t: (t[1] + t[0]) if t[2] else (t[0] + t[1])
        ),
        item=st.one_of(digits, st.integers(0, 6000).map(lambda n: "9" * n)),
        param=st.sampled_from(["limit", "k"]),
        value=st.one_of(digits, st.integers(0, 6000).map(lambda n: "9" * n)),
        method_path=st.sampled_from(
            [
                ("GET", "/v1/users/{u}/history"),
                ("GET", "/v1/users/{u}/search"),
                ("DELETE", "/v1/users/{u}/history/{i}"),
                ("DELETE", "/v1/users/{u}"),
                ("GET", "/v1/users/{u}/export"),
                ("POST", "/v1/users/{u}/history"),
            ]
        ),
    )
    def prop(name, item, param, value, method_path):
        method, template = method_path
        path = template.format(u=quote(name, safe=""), i=quote(item, safe=""))
        query = f"q=cache&{param}={quote(value, safe='')}"
        body = json.dumps({"text": "x"}).encode() if method == "POST" else None
        reply = asgi_request(app, method, path, body, query=query)
        seen[str(reply.status_code)] = seen.get(str(reply.status_code), 0) + 1
        assert reply.status_code < 500, (method, path, query, reply.text[:300])
        if reply.status_code >= 400:
            refused(reply, reply.status_code)
        elif method == "GET" and "json" in reply.headers.get("content-type", ""):
            # A name that is not folded is another user: never alice's or dave's items.
            assert reply.json()["user"] == name
            found = reply.json().get("items", []) + reply.json().get("hits", [])
            assert not {i["text"] for i in found} & SEEDED, (name, found)
        if pllm.store.has_user(name):
            pllm.forget(name)  # a new, distinct user made by POST: not the seeded ones
        assert snapshot(pllm) == before

    prop()
    assert snapshot(pllm) == before
    return seen


def test_hostile_bodies_fuzz_fast(app, pllm, report_counts):
    seen = run_hostile_fuzz(app, pllm, 120)
    report_counts(f"{sum(seen.values())} hostile bodies, statuses {dict(sorted(seen.items()))}")


def test_paths_and_queries_fuzz_fast(app, pllm, report_counts):
    seen = run_boundary_fuzz(app, pllm, 120)
    report_counts(
        f"{sum(seen.values())} odd names, ids and counts, statuses {dict(sorted(seen.items()))}"
    )


@pytest.mark.slow
def test_hostile_bodies_fuzz_many(app, pllm, report_counts):
    seen = run_hostile_fuzz(app, pllm, 1500)
    report_counts(f"{sum(seen.values())} hostile bodies, statuses {dict(sorted(seen.items()))}")


@pytest.mark.slow
def test_paths_and_queries_fuzz_many(app, pllm, report_counts):
    seen = run_boundary_fuzz(app, pllm, 1500)
    report_counts(
        f"{sum(seen.values())} odd names, ids and counts, statuses {dict(sorted(seen.items()))}"
    )


# --- bodies and headers on a real socket -----------------------------------------------------


@pytest.fixture
def running(default_bundle: Path, tmp_path: Path):
    pytest.importorskip("uvicorn")
    from .server_support import Running, free_port

    pllm = PersonalLLM(default_bundle, home=tmp_path, llm_config=LLMConfig(n_ctx=512))
    config = ServerConfig(port=free_port(), read_timeout=1.0, max_body_bytes=1_000_000)
    with Running(pllm, config) as server:
        yield server
    pllm.close()


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_a_chunked_upload_is_refused_while_it_is_read(running, report_counts):
    """150 MB sent chunked (no Content-Length): the server answers 413 once it has read
    past the limit, and its memory does not follow the upload."""
    peak = start = _rss_mb()
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_mb())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    sent = 0
    chunk = b"x" * 65536
    with socket.create_connection(("127.0.0.1", running.config.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/users/alice/history HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        try:
            while sent < 150_000_000:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: what this test wants
        sock.settimeout(10)
        reply = b""
        try:
            while b"\r\n\r\n" not in reply:
                part = sock.recv(4096)
                if not part:
                    break
                reply += part
        except (ConnectionResetError, TimeoutError):
            pass
    stop.set()
    watcher.join()
    report_counts(
        f"chunked upload: {sent / 1e6:.0f} MB sent before the server stopped reading; "
        f"RSS +{peak - start:.0f} MB"
    )
    assert sent < 50_000_000, f"the server read {sent / 1e6:.0f} MB of a 1 MB-limited body"
    assert peak - start < 60, f"RSS grew {peak - start:.0f} MB during the upload"
    if reply:
        assert reply.startswith(b"HTTP/1.1 413"), reply[:100]


def test_a_stalled_request_is_dropped(running):
    port = running.config.port
    # Headers that never finish: the connection is closed after read_timeout.
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(b"POST /v1/users/alice/history HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert sock.recv(4096) == b""
        assert time.monotonic() - started < 10
    # A body that stops half-way: a 408 after read_timeout.
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(
            b"POST /v1/users/alice/history HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"text": '
        )
        started = time.monotonic()
        reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert time.monotonic() - started < 10
