"""Guarantee 6, bad input never corrupts or crashes: hypothesis throws empty, huge, invalid
UTF-8, lone surrogates, NUL bytes, SQL-looking text, wrong vector widths, NaN, odd ids and
counts, random CLI arguments and random server JSON at the public API, the CLI and the
server, and corrupts or truncates the GGUF, ONNX and manifest files of a bundle. Every case
is either accepted correctly or refused with a typed error (EdgePLLMError; a one-line CLI
message; a 4xx OpenAI-style JSON body), and input that was refused leaves the store exactly
as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_pllm import LLMConfig, PersonalLLM, SamplingConfig
from edge_pllm.errors import ContextOverflowError, EdgePLLMError
from edge_pllm.inference.bundle import MANIFEST, STAMP, load_bundle
from edge_pllm.personalization.strategies import Retrieval
from edge_pllm.storage.items import (
    MAX_ITEM_CHARS,
    NewItem,
    read_jsonl,
    validate_items,
    validate_user,
)
from edge_pllm.storage.store import HistoryStore

from .security_support import asgi_request

DIM = 16
SETTINGS = dict(
    deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
SQLISH = [
    "'; DROP TABLE history; --",
    '" OR 1=1 --',
    "Robert'); DELETE FROM users; --",
    "%' AND 1=1 AND '%'='",
    "1; ATTACH DATABASE '/tmp/x' AS x; --",
    "history_vec MATCH 'x'",
]
NASTY_TEXT = st.one_of(
    st.text(max_size=40),  # any code point, lone surrogates included
    st.sampled_from(["", " ", "\t\n", "\x00", "a\x00b", "\ud800", "ok\udfff", *SQLISH]),
    st.binary(max_size=40),  # bytes: valid or invalid UTF-8
    st.integers(MAX_ITEM_CHARS - 2, MAX_ITEM_CHARS + 2).map(lambda n: "x" * n),
    st.integers(),
    st.none(),
    st.lists(st.text(max_size=3), max_size=2),
)
JSONISH = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
ITEM = st.one_of(
    NASTY_TEXT,
    st.builds(
        lambda text, kind, created, meta: {
            "text": text,
            "kind": kind,
            "created_at": created,
            "metadata": meta,
        },
        NASTY_TEXT,
        st.one_of(st.just("text"), NASTY_TEXT),
        st.one_of(st.none(), st.just("2024-05-01"), NASTY_TEXT),
        st.one_of(st.just({}), JSONISH),
    ),
    st.dictionaries(st.sampled_from(["text", "kind", "bogus"]), NASTY_TEXT, max_size=3),
)


def snapshot(store: HistoryStore) -> tuple:
    users = [(u.name, u.items) for u in store.users()]
    items = {
        name: [
            (i.id, i.text, i.kind, i.created_at, json.dumps(i.metadata)) for i in store.items(name)
        ]
        for name, _ in users
    }
    return users, items, store.vector_count(), store.integrity()["integrity_check"]


def expect_typed(call) -> tuple[bool, Any]:
    """(True, result) if accepted; (False, error) if refused with a typed error."""
    try:
        return True, call()
    except EdgePLLMError as exc:
        assert str(exc).strip(), "a typed error must carry a plain message"
        return False, exc


# --- the store: items, vectors, ids, counts ------------------------------------------------


def run_store_fuzz(tmp_path: Path, examples: int) -> int:
    cases = 0
    with HistoryStore(tmp_path / "fuzz.db", DIM) as store:
        rng = np.random.default_rng(0)
        seed_ids = store.add("alice", ["seed one", "seed two"], rng.normal(size=(2, DIM)))

        @settings(max_examples=examples, **SETTINGS)
        @given(
            op=st.sampled_from(["add", "search", "delete", "items", "forget", "vectors"]),
            user=st.one_of(st.just("alice"), st.just("bob"), NASTY_TEXT),
            items=st.lists(ITEM, max_size=4),
            rows=st.integers(-1, 5),
            width=st.sampled_from([DIM, DIM, 0, 1, DIM - 1, DIM + 1]),
            poison=st.sampled_from([None, "nan", "inf"]),
            ids=st.lists(
                st.one_of(st.integers(-3, 10**20), st.sampled_from(seed_ids), NASTY_TEXT),
                max_size=3,
            ),
            k=st.one_of(st.integers(-2, 10**20), st.floats(), NASTY_TEXT),
        )
        def prop(op, user, items, rows, width, poison, ids, k):
            nonlocal cases
            cases += 1
            before = snapshot(store)
            vectors: Any = rng.normal(size=(max(rows, 0), width)) if rows >= 0 else "vectors"
            if poison and rows > 0 and width > 0:
                vectors[0, 0] = float(poison)
            calls = {
                "add": lambda: store.add(user, items, vectors),
                "search": lambda: store.search(user, rng.normal(size=width), k),
                "delete": lambda: store.delete(user, ids),
                "items": lambda: store.items(user, limit=k if isinstance(k, int) else None),
                "forget": lambda: store.forget(user) if user not in ("alice",) else None,
                "vectors": lambda: store.vectors(user),
            }
            ok, result = expect_typed(calls[op])
            after = snapshot(store)
            assert after[3] == "ok"
            if not ok or op in ("search", "items", "vectors"):
                assert after == before, f"{op} changed the store: {result!r}"
            elif op == "add":
                stored = {i.id: i.text for i in store.items(validate_user(user))}
                for item_id, item in zip(result, items, strict=True):
                    text = item["text"] if isinstance(item, dict) else item
                    text = text.decode() if isinstance(text, bytes) else text
                    assert stored[item_id] == text  # accepted means stored as given
                assert store.integrity()["items_without_vector"] == 0

        prop()
    return cases


def test_store_fuzz_fast(tmp_path: Path, report_counts):
    report_counts(f"{run_store_fuzz(tmp_path, 250)} store cases: accepted or typed, no damage")


@pytest.mark.slow
def test_store_fuzz_many(tmp_path: Path, report_counts):
    report_counts(f"{run_store_fuzz(tmp_path, 2000)} store cases: accepted or typed, no damage")


@settings(max_examples=300, **SETTINGS)
@given(
    lines=st.lists(
        st.one_of(st.binary(max_size=60), st.text(max_size=60), JSONISH.map(json.dumps)), max_size=4
    )
)
def test_jsonl_reader_fuzz(lines):
    ok, parsed = expect_typed(lambda: list(read_jsonl(lines)))
    if ok:
        assert all(isinstance(entry, dict) for entry in parsed)
        ok, items = expect_typed(lambda: validate_items(parsed))
        assert not ok or all(isinstance(i, NewItem) and i.text.strip() for i in items)


# --- PersonalLLM: real embedder, real prompt building, context overflow -------------------


@pytest.fixture(scope="module")
def pllm(default_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("fuzz-home")
    with PersonalLLM(default_bundle, home=home, llm_config=LLMConfig(n_ctx=512, n_threads=1)) as p:
        p.add("alice", ["fix(parser): blank lines", "docs: the cache"])
        yield p


MESSAGES = st.one_of(
    NASTY_TEXT,
    st.lists(
        st.one_of(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "system", "assistant", "x"]),
                    "content": NASTY_TEXT,
                }
            ),
            JSONISH,
        ),
        max_size=3,
    ),
)
SPEC = st.one_of(
    st.sampled_from(
        [
            "none",
            "recent",
            "rag:2",
            "rag:0",
            "rag:-1",
            "rag:x",
            "plug",
            "plug+rag:1",
            "rag:99999999999999999999",
            "recent:4096",
        ]
    ),
    st.text(max_size=12),
)


def run_personal_fuzz(pllm: PersonalLLM, examples: int) -> int:
    cases = 0

    @settings(max_examples=examples, **SETTINGS)
    @given(
        op=st.sampled_from(["add", "prepare", "prepare"]),
        user=st.one_of(st.just("alice"), NASTY_TEXT),
        items=st.one_of(ITEM, st.lists(ITEM, max_size=3)),
        prompt=MESSAGES,
        spec=SPEC,
        max_tokens=st.one_of(st.integers(-2, 600), st.just(10**9)),
        temperature=st.one_of(st.floats(), st.just(0.0)),
    )
    def prop(op, user, items, prompt, spec, max_tokens, temperature):
        nonlocal cases
        cases += 1
        before = snapshot(pllm.store)
        if op == "add":
            ok, _ = expect_typed(lambda: pllm.add(user, items))
            if not ok:
                assert snapshot(pllm.store) == before
            return
        ok, prepared = expect_typed(
            lambda: pllm.prepare(
                user, prompt, spec, SamplingConfig(max_tokens=max_tokens, temperature=temperature)
            )
        )
        if ok:  # it fits the context: prompt + soft tokens + the tokens asked for
            n = pllm.llm.count_tokens(prepared.prompt)
            soft = prepared.personalization.soft_tokens
            assert n + (0 if soft is None else len(soft)) + max_tokens <= pllm.llm.n_ctx
            assert max_tokens >= 1 and math.isfinite(temperature)
        elif isinstance(prepared, ContextOverflowError):
            assert prepared.n_ctx == pllm.llm.n_ctx
        assert snapshot(pllm.store) == before

    prop()
    return cases


def test_personal_llm_fuzz_fast(pllm, report_counts):
    report_counts(f"{run_personal_fuzz(pllm, 80)} PersonalLLM add/prepare cases: typed or ok")


@pytest.mark.slow
def test_personal_llm_fuzz_many(pllm, report_counts):
    report_counts(f"{run_personal_fuzz(pllm, 600)} PersonalLLM add/prepare cases: typed or ok")


@settings(max_examples=8, **SETTINGS)
@given(
    n=st.integers(1, 30),
    size=st.integers(1, 400),
    k=st.integers(1, 40),
    max_tokens=st.integers(1, 500),
)
def test_history_overflowing_the_context_is_cut_or_refused(pllm, n, size, k, max_tokens):
    user = f"overflow-{n}-{size}"
    if not pllm.store.has_user(user):
        pllm.add(user, [f"item {i} " + "lorem ipsum " * size for i in range(n)])
    sampling = SamplingConfig(max_tokens=max_tokens)
    # rag with every nearest item shown, however far: the most history a prompt can get
    for spec in (f"recent:{k}", Retrieval(k=k, min_similarity=-1.0)):
        try:
            p = pllm.prepare(user, "Summarize my notes.", spec, sampling)
        except ContextOverflowError as exc:  # only when the bare request cannot fit
            assert exc.prompt_tokens + max_tokens > pllm.llm.n_ctx
            continue
        assert pllm.llm.count_tokens(p.prompt) + max_tokens <= pllm.llm.n_ctx
        assert len(p.personalization.context) + p.dropped_context == min(k, n)
        assert "Summarize my notes." in p.prompt


# --- the CLI ------------------------------------------------------------------------------

CLI_WORD = st.one_of(
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
        max_size=12,
    ),
    st.sampled_from(
        [
            "alice",
            "-",
            "--json",
            "-k",
            "0",
            "-1",
            "99999999999999999999",
            "--yes",
            "-n",
            "1",
            "-s",
            "rag:2",
            "--limit",
            "-f",
            "nan",
            *SQLISH,
        ]
    ),
)
USER = st.one_of(st.just("alice"), st.just("bob"), CLI_WORD)
NUMBER = st.one_of(st.integers(-3, 10**20).map(str), st.sampled_from(["nan", "inf", "1e3", "x"]))
COMMANDS = [
    "add",
    "items",
    "search",
    "delete",
    "dump",
    "load",
    "forget",
    "users",
    "ask",
    "ingest",
    "status",
]
# Well-formed command lines with nasty values (most get past click's own checks), and
# random words (which mostly do not).
COMMAND_LINE = st.one_of(
    st.tuples(USER, st.lists(CLI_WORD, min_size=1, max_size=3)).map(lambda t: ["add", t[0], *t[1]]),
    st.tuples(USER, st.sampled_from([["-"], ["-f", "-", "--jsonl"], ["-", "--kind", "x y"]])).map(
        lambda t: ["add", t[0], *t[1]]
    ),
    st.tuples(USER, NUMBER, st.booleans()).map(
        lambda t: ["items", t[0], "--limit", t[1], *(["--json"] if t[2] else [])]
    ),
    st.tuples(USER, CLI_WORD, NUMBER).map(lambda t: ["search", t[0], t[1], "-k", t[2]]),
    st.tuples(USER, st.lists(NUMBER, min_size=1, max_size=3)).map(
        lambda t: ["delete", t[0], *t[1]]
    ),
    USER.map(lambda u: ["dump", u]),
    USER.map(lambda u: ["load", u, "-"]),
    USER.map(lambda u: ["forget", u, "--yes"]),
    st.tuples(USER, CLI_WORD, SPEC, NUMBER).map(
        lambda t: ["ask", t[0], t[1], "-s", t[2], "-t", t[3], "-n", "1"]
    ),
    st.sampled_from([["users"], ["status"]]),
    st.tuples(st.sampled_from(COMMANDS), st.lists(CLI_WORD, max_size=4)).map(
        lambda t: [t[0], *t[1]]
    ),
)


def run_cli_fuzz(default_bundle: Path, home: Path, monkeypatch, examples: int) -> tuple:
    from click.testing import CliRunner

    import edge_pllm.cli as cli_module

    shared = PersonalLLM(default_bundle, home=home, llm_config=LLMConfig(n_ctx=512, n_threads=1))
    shared.add("alice", ["fix: a typo", "feat: a flag"])
    shared.close = lambda: None  # one runtime for every invocation (loading is not tested here)
    monkeypatch.setattr(cli_module, "PersonalLLM", lambda *a, **kw: shared)
    runner = CliRunner()
    cases = 0
    exits: dict[int, int] = {}

    @settings(max_examples=examples, **SETTINGS)
    @given(
        line=COMMAND_LINE,
        stdin=st.one_of(st.none(), st.binary(max_size=80), JSONISH.map(json.dumps)),
    )
    def prop(line, stdin):
        nonlocal cases
        cases += 1
        command, *args = line
        if command == "ask" and "-n" not in args:
            args = [*args, "-n", "1"]
        if command == "forget" and "alice" in args:
            return  # keep the seed user; forgetting is fuzzed for other names
        before = snapshot(shared.store)
        result = runner.invoke(
            cli_module.cli, ["--bundle", str(default_bundle), command, *args], input=stdin
        )
        assert result.exit_code in (0, 1, 2), result.output
        exits[result.exit_code] = exits.get(result.exit_code, 0) + 1
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            f"{command} {args!r}: {result.exception!r}"
        )
        assert "Traceback" not in result.output
        if result.exit_code != 0:
            assert snapshot(shared.store) == before
            assert result.output.strip()  # a message that says what was wrong

    prop()
    return cases, dict(sorted(exits.items()))


def test_cli_fuzz_fast(default_bundle, isolated_home, monkeypatch, report_counts):
    n, exits = run_cli_fuzz(default_bundle, isolated_home, monkeypatch, 60)
    report_counts(f"{n} CLI invocations, exit codes {exits}: no traceback, no change on error")


@pytest.mark.slow
def test_cli_fuzz_many(default_bundle, isolated_home, monkeypatch, report_counts):
    n, exits = run_cli_fuzz(default_bundle, isolated_home, monkeypatch, 500)
    report_counts(f"{n} CLI invocations, exit codes {exits}: no traceback, no change on error")


# --- the server ---------------------------------------------------------------------------

PATHS = st.sampled_from(
    [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/users/{u}/history"),
        ("GET", "/v1/users/{u}/history"),
        ("GET", "/v1/users/{u}/search"),
        ("DELETE", "/v1/users/{u}/history/{i}"),
        ("DELETE", "/v1/users/{u}"),
        ("GET", "/v1/users/{u}/export"),
        ("POST", "/v1/users/{u}/feedback"),
        ("GET", "/v1/models"),
    ]
)
BODY_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "user": st.one_of(st.just("alice"), NASTY_TEXT, JSONISH),
        "messages": st.one_of(MESSAGES, JSONISH),
        "prompt": st.one_of(NASTY_TEXT, JSONISH),
        "max_tokens": st.one_of(st.integers(-2, 3), st.just(10**12), JSONISH),
        "temperature": st.one_of(st.floats(), JSONISH),
        "stream": st.one_of(st.booleans(), JSONISH),
        "stop": st.one_of(NASTY_TEXT, JSONISH),
        "edge_pllm": st.one_of(
            st.fixed_dictionaries(
                {"strategy": SPEC}, optional={"remember": st.one_of(st.booleans(), JSONISH)}
            ),
            JSONISH,
        ),
        "items": st.one_of(st.lists(ITEM, max_size=3), JSONISH),
        "text": NASTY_TEXT,
        "answer_id": st.one_of(st.just("chatcmpl-0"), NASTY_TEXT, JSONISH),
        "rating": st.one_of(st.integers(-2, 2), JSONISH),
        "edit": st.one_of(NASTY_TEXT, JSONISH),
    },
)


def _jsonable(value: Any) -> Any:
    """bytes and surrogates cannot go into JSON text: send them as lossy strings."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {_jsonable(k): _jsonable(v) for k, v in value.items()}
    return value


def run_server_fuzz(pllm: PersonalLLM, examples: int) -> dict[str, int]:
    from urllib.parse import quote

    from edge_pllm.server import ServerConfig, create_app

    app = create_app(pllm, ServerConfig(max_tokens_limit=3, max_body_bytes=200_000))
    seen: dict[str, int] = {}

    @settings(max_examples=examples, **SETTINGS)
    @given(
        route=PATHS,
        user=st.one_of(st.just("alice"), st.text(max_size=10)),
        item=st.one_of(st.integers(-2, 10**20), st.text(max_size=5)),
        body=st.one_of(BODY_FIELDS, JSONISH, st.binary(max_size=50)),
        query=st.sampled_from(
            [
                "",
                "q=cache",
                "q=",
                "q=x&k=0",
                "k=99999999999999999999&q=a",
                "limit=-1",
                "limit=abc",
                "q=%00",
            ]
        ),
    )
    def prop(route, user, item, body, query):
        method, template = route
        path = template.format(u=quote(user, safe=""), i=quote(str(item), safe=""))
        if template == "/v1/users/{u}" and user == "alice":
            return  # keep the seed user
        before = snapshot(pllm.store)
        raw = body if isinstance(body, bytes) else json.dumps(_jsonable(body)).encode()
        reply = asgi_request(app, method, path, raw, query=query)
        seen[str(reply.status_code)] = seen.get(str(reply.status_code), 0) + 1
        assert reply.status_code < 500, (method, path, raw[:200], reply.text[:300])
        if reply.status_code >= 400:
            error = reply.json()["error"]
            assert error["message"] and error["type"]
            assert snapshot(pllm.store) == before
        elif "event-stream" not in reply.headers.get("content-type", ""):
            reply.body.decode("utf-8")

    prop()
    return seen


def test_server_fuzz_fast(pllm, report_counts):
    pytest.importorskip("starlette", reason="the server needs the [server] extra")
    seen = run_server_fuzz(pllm, 150)
    report_counts(f"{sum(seen.values())} server requests, statuses {dict(sorted(seen.items()))}")


@pytest.mark.slow
def test_server_fuzz_many(pllm, report_counts):
    pytest.importorskip("starlette", reason="the server needs the [server] extra")
    seen = run_server_fuzz(pllm, 1200)
    report_counts(f"{sum(seen.values())} server requests, statuses {dict(sorted(seen.items()))}")


# --- corrupt and truncated model files ----------------------------------------------------

LOADER = r"""
import sys
from edge_pllm.inference.bundle import load_bundle
from edge_pllm.errors import BundleError, EdgePLLMError
try:
    b = load_bundle(sys.argv[1])
    from edge_pllm.inference.embedder import Embedder
    e = Embedder(b.file(b.embedder.file), b.file(b.embedder.tokenizer), b.embedder.config)
    e.embed_one("hello")
    if b.manifest.get("plug"):
        from edge_pllm.personalization.head import PlugHead
        PlugHead(b)
    if sys.argv[2] == "llm":
        from edge_pllm.inference.llm import LLM, LLMConfig
        LLM(b.file(b.llm.file), LLMConfig(n_ctx=64, n_threads=1))
    print("LOADED")
except EdgePLLMError as exc:
    print("TYPED", type(exc).__name__, str(exc)[:200])
"""


def corrupt(path: Path, how: str, seed: int) -> None:
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    if how == "truncate":
        data = data[: int(rng.integers(0, max(1, len(data) // 2)))]
    elif how == "header":  # the format's header and metadata, where parsers trust sizes
        for pos in rng.integers(0, min(len(data), 4096), size=8):
            data[pos] = int(rng.integers(0, 256))
    elif how == "zero":
        data = bytearray(len(data))
    path.write_bytes(bytes(data))


def rehash(bundle: Path) -> None:
    """A bundle whose manifest matches its corrupted files (a broken build, not tampering)."""
    m = json.loads((bundle / MANIFEST).read_text())
    for name in m["files"]:
        data = (bundle / name).read_bytes()
        m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (bundle / MANIFEST).write_text(json.dumps(m))
    (bundle / STAMP).unlink(missing_ok=True)


def run_corruption(default_bundle: Path, tmp_path: Path, cases: list[tuple[str, str, int]]):
    outcomes: dict[str, int] = {}
    names = json.loads((default_bundle / MANIFEST).read_text())["files"]
    for target, how, seed in cases:
        if target not in names:
            continue
        bundle = tmp_path / f"b-{target}-{how}-{seed}"
        shutil.copytree(default_bundle, bundle, ignore=shutil.ignore_patterns(STAMP))
        corrupt(bundle / target, how, seed)
        with pytest.raises(EdgePLLMError, match=r"checksum|missing|manifest"):
            load_bundle(bundle)  # as shipped: the checksum refuses it by name
        rehash(bundle)
        kind = "llm" if target == "llm.gguf" else "rest"
        run = subprocess.run(
            [sys.executable, "-c", LOADER, str(bundle), kind],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, (target, how, seed, run.returncode, run.stderr[-800:])
        lines = run.stdout.strip().splitlines()  # onnxruntime may print its own notes first
        outcome = lines[-1].split()[0] if lines else "?"
        assert outcome in ("LOADED", "TYPED"), run.stdout + run.stderr[-800:]
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(bundle)
    return outcomes


MODEL_FILES = ["llm.gguf", "embedder.onnx", "tokenizer.json", "plug.onnx", "plug_project.onnx"]


def test_corrupt_model_files_fast(default_bundle: Path, tmp_path: Path, report_counts):
    cases = [("llm.gguf", "truncate", 1), ("embedder.onnx", "header", 1)]
    cases += [("tokenizer.json", "truncate", 2), ("plug.onnx", "truncate", 1)]
    outcomes = run_corruption(default_bundle, tmp_path, cases)
    report_counts(f"{sum(outcomes.values())} corrupt model files: {outcomes}")


@pytest.mark.slow
def test_corrupt_model_files_many(default_bundle: Path, tmp_path: Path, report_counts):
    cases = [
        (f, how, seed)
        for f in MODEL_FILES
        for how in ("truncate", "header", "zero")
        for seed in range(3 if how != "zero" else 1)
    ]
    outcomes = run_corruption(default_bundle, tmp_path, cases)
    report_counts(f"{sum(outcomes.values())} corrupt model files: {outcomes}")


@settings(max_examples=150, **SETTINGS)
@given(manifest=st.one_of(JSONISH, st.binary(max_size=40)), mutate=st.booleans())
def test_manifest_fuzz(default_bundle: Path, tmp_path_factory, manifest, mutate):
    folder = tmp_path_factory.mktemp("manifest")
    if mutate and isinstance(manifest, dict):  # a real manifest with fuzzed sections
        good = json.loads((default_bundle / MANIFEST).read_text())
        manifest = {**good, **manifest}
    raw = manifest if isinstance(manifest, bytes) else json.dumps(_jsonable(manifest)).encode()
    (folder / MANIFEST).write_bytes(raw)
    expect_typed(lambda: load_bundle(folder))
    shutil.rmtree(folder)
