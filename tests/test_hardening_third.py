"""Hardening, third round (issue 33), by class of defect, each fixed where it lives:

1. one rule for names: visible characters only, by Unicode properties, never folded;
2. bytes decoded strictly, once, at the edge (URLs, standard input);
3. every validation pattern matches the whole string;
4. numbers bounded before they are parsed, and no empty value taken for one;
5. every file and folder written private (evaluation outputs included);
6. text from the store or the model escaped on its way to a terminal;
7. a total deadline for a request body;
8. a text of nothing visible (an edit of format characters) refused.

The red team's reproducers are regression tests; hypothesis then throws each class at its
surfaces. Counts go to the run's "security counts" section.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path
from urllib.parse import quote, quote_from_bytes

import pytest

pytest.importorskip("hypothesis")
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_pllm import LLMConfig, PersonalLLM
from edge_pllm.cli import cli
from edge_pllm.errors import InvalidInputError
from edge_pllm.storage.items import _INVISIBLE, invisible, validate_user
from edge_pllm.terminal import shown, shown_json

SETTINGS = dict(
    deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
FAST, MANY = 150, 1500

# Every kind of character that shows as nothing: the red team's, and one of each class.
REPORTED = ["\u3164", "\u034f", "\u2800", "\uffa0", "\u2028"]
CLASSES = [
    "\u00ad", "\u061c", "\u115f", "\u17b4", "\u180e", "\u200b", "\u200d", "\u202e", "\u2066",
    "\ufe0f", "\ufeff", "\ufff0", "\U0001bca0", "\U0001d173", "\U000e0001", "\U000e0100",
    "\u2029", "\u00a0", "\u2003", "\u3000", "\ue000", "\U000f0000", "\u0378", "\x00", "\x1b",
    "\x9b", "\ud800",
]  # fmt: skip


def unseen_chars() -> st.SearchStrategy[str]:
    ranges = st.sampled_from(_INVISIBLE).flatmap(lambda r: st.integers(r[0], r[1]))
    by_category = st.characters(
        codec=None, categories=["Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"]
    ).filter(lambda c: c != " ")
    return st.one_of(ranges.map(chr), by_category, st.sampled_from(REPORTED + CLASSES))


VISIBLE_NAMES = st.text(
    st.characters(codec="utf-8", categories=["L", "N", "P", "S"]).filter(
        lambda c: not invisible(c) and c != "/"
    ),
    min_size=1,
    max_size=12,
)


# --- 1. names --------------------------------------------------------------------------------


@pytest.mark.parametrize("char", REPORTED + CLASSES)
def test_a_name_with_a_character_that_shows_as_nothing_is_refused(char: str):
    for name in (f"alice{char}", f"{char}alice", f"al{char}ice"):
        with pytest.raises(InvalidInputError, match="user name"):
            validate_user(name)


def test_names_that_look_right_are_accepted_as_they_are():
    for name in ["alice", "Zoë", "José María", "名前", "Ελένη", "a-b_c.d@e", "ok 👍", "x+y"]:
        assert validate_user(name) == name
    with pytest.raises(InvalidInputError, match="combining mark"):
        validate_user("\u0301alice")


def _check_names(names: list[str], report_counts, label: str) -> None:
    refused = 0
    for name in names:
        try:
            validate_user(name)
        except InvalidInputError:
            refused += 1
            continue
        raise AssertionError(f"accepted {name!r}")
    report_counts(f"{label}: {len(names)} names with an unseen character, {refused} refused")


def names_fuzz(examples: int) -> int:
    """A visible name with one unseen character put anywhere in it: refused; the name
    without it: accepted as it is. Returns the names tried."""
    tried = 0

    @settings(max_examples=examples, **SETTINGS)
    @given(name=VISIBLE_NAMES, char=unseen_chars(), data=st.data())
    def prop(name: str, char: str, data: st.DataObject) -> None:
        nonlocal tried
        at = data.draw(st.integers(0, len(name)))
        with pytest.raises(InvalidInputError):
            validate_user(name[:at] + char + name[at:])
        assert validate_user(name) == name
        tried += 2

    prop()
    return tried


def test_names_fuzz(report_counts):
    report_counts(f"{names_fuzz(FAST)} names (half with an unseen character): 0 bad outcomes")


@pytest.mark.slow
def test_names_fuzz_many(report_counts):
    report_counts(f"{names_fuzz(MANY)} names (half with an unseen character): 0 bad outcomes")


@pytest.mark.slow
def test_every_invisible_code_point_in_a_name_is_refused(report_counts):
    codes = [c for lo, hi in _INVISIBLE for c in range(lo, hi + 1)]
    codes += [c for c in range(0x110000) if unicodedata.category(chr(c)) in ("Zl", "Zp", "Zs")]
    _check_names([f"a{chr(c)}b" for c in codes if c != 0x20], report_counts, "all invisibles")


@pytest.fixture
def client(pllm: PersonalLLM):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from edge_pllm.server import ServerConfig, create_app

    pllm.add("alice", ["alice's note"])
    return TestClient(create_app(pllm, ServerConfig(max_tokens_limit=2)))


def test_the_server_refuses_the_reported_names(client, pllm: PersonalLLM):
    for char in REPORTED:
        path = f"/v1/users/{quote('alice' + char)}"
        assert client.post(f"{path}/history", json={"items": [{"text": "x"}]}).status_code == 400
        assert client.get(f"{path}/history").status_code == 400
        assert client.delete(path).status_code == 400
    assert [u.name for u in pllm.store.users()] == ["alice"]


# --- 2. bytes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", "/v1/users/%ED%A0%80/history"),
        ("get", "/v1/users/%FF%FE%FD/history"),
        ("delete", "/v1/users/%C0%AF%80"),
        ("get", "/v1/users/alice/search?q=%ED%A0%80"),
        ("get", "/v1/users/alice/history?limit=%FF"),
    ],
)
def test_urls_that_are_not_utf8_are_400s(client, pllm: PersonalLLM, method: str, path: str):
    kwargs = {"json": {"items": [{"text": "x"}]}} if method == "post" else {}
    reply = getattr(client, method)(path, **kwargs)
    assert reply.status_code == 400 and "not UTF-8" in reply.json()["error"]["message"]
    assert [(u.name, u.items) for u in pllm.store.users()] == [("alice", 1)]


def url_fuzz(client, examples: int) -> Counter:
    """Random bytes, percent-encoded, as a user name and as a search query: a 400 that
    says "not UTF-8" exactly when they are not UTF-8, and never a 5xx."""
    statuses: Counter = Counter()

    @settings(max_examples=examples, **SETTINGS)
    @given(raw=st.binary(min_size=1, max_size=8))
    def prop(raw: bytes) -> None:
        try:
            raw.decode("utf-8")
            utf8 = True
        except UnicodeDecodeError:
            utf8 = False
        encoded = quote_from_bytes(raw, safe="")
        for path in (f"/v1/users/{encoded}/history", f"/v1/users/alice/search?q={encoded}"):
            reply = client.get(path)
            statuses[reply.status_code] += 1
            assert reply.status_code in (200, 400, 404, 405), (path, reply.status_code)
            message = reply.json()["error"]["message"] if reply.status_code >= 400 else ""
            assert ("not UTF-8" in message) is (not utf8), (path, reply.status_code, message)

    prop()
    return statuses


def test_url_bytes_fuzz(client, report_counts):
    seen = url_fuzz(client, FAST)
    report_counts(
        f"{sum(seen.values())} URLs of random bytes, statuses {dict(sorted(seen.items()))}"
    )


@pytest.mark.slow
def test_url_bytes_fuzz_many(client, report_counts):
    seen = url_fuzz(client, MANY)
    report_counts(
        f"{sum(seen.values())} URLs of random bytes, statuses {dict(sorted(seen.items()))}"
    )


def test_chat_drops_a_line_that_is_not_utf8(default_bundle: Path, tmp_path: Path):
    """`chat` with strict decoding of standard input: the line is left out in one sentence,
    the session goes on, and nothing is stored."""
    env = {**os.environ, "EDGE_PLLM_HOME": str(tmp_path), "PYTHONIOENCODING": "utf-8:strict"}
    env.pop("PYTHONUTF8", None)
    done = subprocess.run(
        [sys.executable, "-m", "edge_pllm", "--bundle", str(default_bundle), "chat", "alice"],
        input=b"\xff\xfe bad\n/quit\n",
        capture_output=True,
        env=env,
        timeout=120,
    )
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, out
    assert "Traceback" not in out and "not UTF-8 text" in out


# --- 3. patterns -----------------------------------------------------------------------------


def test_no_validation_pattern_ends_at_dollar():
    """`$` also matches before a final newline: every pattern is matched whole (fullmatch,
    or \\A…\\z for pydantic's engine), never anchored with `$`, never `re.match`ed."""
    import edge_pllm
    import export

    roots = [Path(edge_pllm.__file__).parent, Path(export.__file__).parent]  # as installed
    sources = [p for root in roots for p in root.rglob("*.py")]
    assert len(sources) > 40
    found = []
    for path in sources:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            dollar = re.search(r"\$[\"']", line)
            if dollar or re.search(r"\b(re|_?[A-Z][A-Z0-9_]+)\.match\(", line):
                found.append(f"{path.name}:{n}: {line.strip()}")
    assert not found, found


def test_values_with_a_final_newline_are_refused(pllm: PersonalLLM):
    with pytest.raises(InvalidInputError, match="kind"):
        pllm.add("alice", [{"text": "x", "kind": "note\n"}])
    with pytest.raises(InvalidInputError, match="answer id"):
        pllm.generate("alice", "hi", answer_id="abc\n", remember=True)
    assert not pllm.store.has_user("alice")


# --- 4. numbers and empty values -------------------------------------------------------------


@pytest.fixture
def run(default_bundle: Path, isolated_home: Path):
    runner = CliRunner()

    def invoke(*args: str, input: str | bytes | None = None):
        result = runner.invoke(cli, ["--bundle", str(default_bundle), *args], input=input)
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            f"{result.exception!r}\n{result.output}"
        )
        assert "Traceback" not in result.output
        return result

    return invoke


def _task(folder: Path) -> Path:
    from edge_pllm.tasks.lamp import write_split

    profile = [{"id": f"p{k}", "title": f"fix: thing {k}", "text": f"body {k}"} for k in range(3)]
    questions = [{"id": f"q{n}", "input": f"body of {n}", "profile": profile} for n in range(2)]
    golds = [{"id": f"q{n}", "output": f"fix: {n}"} for n in range(2)]
    write_split(folder, "test", "commit_subject", questions, golds)
    return folder


def test_numbers_are_bounded_before_they_are_read(run, tmp_path: Path):
    task = _task(tmp_path / "task")
    huge = "9" * 5000
    for shard in (f"1/{huge}", f"{huge}/2", f"-1/{huge}"):
        result = run("eval", str(task), "--split", "test", "--shard", shard, "-s", "none")
        assert result.exit_code == 1 and "--shard" in result.output
        assert len(result.output) < 300, "a sentence, not the input again"


@pytest.mark.parametrize(
    "args",
    [
        ("eval", "{task}", "--split", "test", "--shard", ""),
        ("eval", "{task}", "--split", ""),
        ("eval", "{task}", "--out", ""),
        ("dump", "alice", "--feedback", ""),
        ("dump", "alice", "-o", ""),
        ("ask", "alice", "hi", "-s", ""),
        ("items", "alice", "--limit", ""),
        ("add", "alice", "-f", ""),
        ("import", "alice", "--git", ""),
        ("--home", "", "users"),
    ],
)
def test_an_empty_value_is_refused_not_taken(run, tmp_path: Path, args: tuple[str, ...]):
    task = _task(tmp_path / "task")
    before = set(os.listdir(Path.cwd()))
    result = run(*(a.replace("{task}", str(task)) for a in args))
    assert result.exit_code == 2, result.output
    assert set(os.listdir(Path.cwd())) == before, "an empty path wrote into the current folder"


# --- 5. files --------------------------------------------------------------------------------


def _open_to_others(root: Path) -> list[str]:
    found = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            found.append(f"{path} {mode:o}")
    return found


def test_evaluation_outputs_are_owner_only_under_umask_022(run, tmp_path: Path, isolated_home):
    pytest.importorskip("rouge_score", reason="ROUGE needs the [eval] extra")
    task = _task(tmp_path / "task")
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        result = run("eval", str(task), "--split", "test", "-s", "none", "--out", str(out))
        assert result.exit_code == 0, result.output
        report = tmp_path / "reports" / "EVAL.md"
        result = run("eval", str(task), "--split", "test", "-s", "none", "--report", str(report))
        assert result.exit_code == 0 and report.is_file(), result.output
    finally:
        os.umask(old)
    assert {p.name for p in out.iterdir()} >= {"predictions.jsonl", "test_metrics.json"}
    assert not _open_to_others(out) and not _open_to_others(isolated_home)
    assert not _open_to_others(report.parent)


# --- 6. terminals ----------------------------------------------------------------------------

HOSTILE = "ok \x1b]0;owned\x07\x1b[2J\x9b31m\u202etxt.exe\r\x08 \u200b end"


def _safe(text: str) -> bool:
    return not any(
        unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") and c not in "\n\t" for c in text
    )


def test_stored_text_reaches_the_terminal_escaped(run, pllm_home_with_hostile_item):
    for args in (
        ("items", "mallory"),
        ("items", "mallory", "--json"),
        ("search", "mallory", "owned"),
        ("dump", "mallory"),
        ("users",),
    ):
        result = run(*args)
        assert result.exit_code == 0, result.output
        assert _safe(result.output), (args, result.output)
        assert "\\x1b" in result.output or "\\u001b" in result.output or args == ("users",)
    dumped = run("dump", "mallory").output.splitlines()
    assert json.loads(dumped[0])["text"] == HOSTILE  # the same JSON value, escaped


@pytest.fixture
def pllm_home_with_hostile_item(run):
    assert run("add", "mallory", HOSTILE).exit_code == 0


@settings(max_examples=FAST, **SETTINGS)
@given(text=st.text(st.characters(codec=None), max_size=40))
def test_terminal_escaping_fuzz(text: str):
    assert _safe(shown(text)) and "\n" not in shown(text, keep="")
    line = json.dumps({"t": text}, ensure_ascii=False)
    assert _safe(shown_json(line)) and json.loads(shown_json(line)) == {"t": text}


# --- 7. slow uploads -------------------------------------------------------------------------


def test_a_trickled_body_meets_its_total_deadline(default_bundle: Path, tmp_path: Path):
    pytest.importorskip("uvicorn")
    from edge_pllm.server import ServerConfig

    from .server_support import Running, free_port

    pllm = PersonalLLM(default_bundle, home=tmp_path, llm_config=LLMConfig(n_ctx=512))
    config = ServerConfig(port=free_port(), read_timeout=1.0, body_timeout=3.0)
    with (
        Running(pllm, config),
        socket.create_connection(("127.0.0.1", config.port), timeout=15) as sock,
    ):
        sock.sendall(
            b"POST /v1/users/alice/history HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        started, reply = time.monotonic(), b""
        sock.settimeout(0.4)
        while not reply and time.monotonic() - started < 15:
            try:
                sock.sendall(b" ")  # a byte every 0.4 s: never a stall of 1 s
                reply = sock.recv(4096)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        took = time.monotonic() - started
    pllm.close()
    assert reply.startswith(b"HTTP/1.1 408") and b"took over 3 s" in reply, reply[:300]
    assert took < 8


# --- 8. nothing visible ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["\u200b\u200d\u2060", "\u3164\u3164", " \u00ad\n", "\ufeff"])
def test_a_text_of_nothing_visible_is_refused_as_an_item_or_an_edit(pllm: PersonalLLM, text):
    with pytest.raises(InvalidInputError, match="nothing visible"):
        pllm.add("alice", [text])
    pllm.add("alice", ["fix: a real note"])
    answer = pllm.generate("alice", "hi", strategy="none", remember=True, sampling=_short())
    with pytest.raises(InvalidInputError, match="nothing visible"):
        pllm.feedback("alice", answer.id, edit=text)
    kinds = Counter(i.kind for i in pllm.store.items("alice", limit=10))
    assert kinds == {"text": 1, "turn": 1}


def _short():
    from edge_pllm import SamplingConfig

    return SamplingConfig(max_tokens=2)
