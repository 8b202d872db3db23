"""`edge-pllm chat` end to end in a pseudo-terminal: a real process, the default bundle, an
isolated home; turns stream, memory and feedback land in the store, Ctrl-C ends a reply."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pty = pytest.importorskip("pty")
fcntl = pytest.importorskip("fcntl")
termios = pytest.importorskip("termios")

TIMEOUT = 60.0
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
USER = "alice"
HISTORY = [
    "fix: typo in the cache docs",
    "feat: add a --json flag to items",
    "refactor: split the store into rooms",
]


def _controlling_tty() -> None:  # in the child, a session leader: the pty becomes its tty
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    # As a terminal starts a program: a test run in the background (`cmd &` in a script)
    # inherits SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """`edge-pllm ...` on the slave side of a pseudo-terminal; reads and writes the master."""

    def __init__(self, *args: str, home: Path):
        master, slave = pty.openpty()
        env = {**os.environ, "EDGE_PLLM_HOME": str(home), "TERM": "xterm", "COLUMNS": "200"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_pllm.cli", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
            preexec_fn=_controlling_tty,
        )
        os.close(slave)
        self.fd = master
        self.seen = b""  # everything read, escape sequences removed, "\r\n" as "\n"
        self.pos = 0  # where the next expect starts looking

    def _read(self, deadline: float) -> bool:
        import select

        ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not chunk:
            return False
        self.seen += ANSI.sub(b"", chunk).replace(b"\r\n", b"\n")
        return True

    def expect(self, pattern: str | bytes, timeout: float = TIMEOUT) -> str:
        """Wait for `pattern` (a regex) after what earlier expects matched; the text up to
        and including the match."""
        regex = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.seen, self.pos)
            if found:
                text = self.seen[self.pos : found.end()].decode("utf-8", "replace")
                self.pos = found.end()
                return text
            if not self._read(deadline):  # the time is up, or the process has closed it
                tail = self.seen[self.pos :].decode("utf-8", "replace")
                raise AssertionError(f"{pattern!r} not seen; after the last match:\n{tail}")

    def wait_reading(self, timeout: float = 10.0) -> None:
        """Wait until the child's main thread sleeps in its terminal read. CPython's
        readline checks for signals before it blocks in select(), so a Ctrl-C that lands in
        between is seen only after the next key: no hand types that fast, a test can (seen
        on a loaded machine). Where /proc is missing, a short pause stands in."""
        wchan = Path(f"/proc/{self.proc.pid}/wchan")
        if not wchan.exists():
            time.sleep(0.5)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(w in wchan.read_text() for w in ("select", "poll", "wait_woken", "read")):
                return
            time.sleep(0.01)

    def send(self, text: str | bytes) -> None:
        os.write(self.fd, text.encode() if isinstance(text, str) else text)

    def line(self, text: str) -> None:
        self.send(text + "\r")

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=TIMEOUT)
        finally:
            os.close(self.fd)


def edge_pllm(*args: str, home: Path) -> str:
    env = {**os.environ, "EDGE_PLLM_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-m", "edge_pllm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    return done.stdout


@pytest.fixture
def chat(default_bundle: Path, isolated_home: Path):
    base = ["--bundle", str(default_bundle)]
    edge_pllm(*base, "add", USER, *HISTORY, home=isolated_home)
    started: list[Terminal] = []

    def start(*args: str, n_ctx: int = 1024) -> Terminal:
        term = Terminal(*base, "--n-ctx", str(n_ctx), "chat", USER, *args, home=isolated_home)
        started.append(term)
        term.expect(r"Chatting with alice \(3 history items; strategy recent:2; memory (on|off)\)")
        return term

    yield start
    for term in started:
        if term.proc.poll() is None:
            term.proc.kill()
            term.proc.wait()


def prompt(term: Terminal) -> None:
    term.expect(r"alice> ")


def _store(home: Path, bundle: Path):
    from edge_pllm.inference.bundle import load_bundle
    from edge_pllm.paths import database_path
    from edge_pllm.storage.store import HistoryStore

    dim = load_bundle(bundle).embedder.config.dim
    return HistoryStore(database_path(home), dim)


def test_chat_remembers_turns_takes_feedback_and_keeps_the_conversation(
    chat, default_bundle: Path, isolated_home: Path
):
    term = chat("-s", "recent:2", "-n", "8", "--remember")
    prompt(term)
    term.line("Write a commit subject for: fixed the cache key")
    # The dim line says what personalized the reply (the two newest items), then it streams.
    term.expect(r"\[recent:2 · 2 items\]\n")
    first = term.expect(r"alice> ")
    assert first.removesuffix("alice> ").strip()  # an answer was streamed
    term.line("/rate +1")
    term.expect(r"Rated the last answer \+1\.")
    prompt(term)
    term.line("/edit fix: key the cache by content")
    term.expect(r"Kept your edit as history item #\d+\.")
    prompt(term)
    term.line("And one for: sped up the search")
    # The second turn carries the first exchange (and the remembered turn and the edit are
    # history now: more than two candidates, still two shown).
    term.expect(r"\[recent:2 · 2 items · 1 earlier exchange\]\n")
    prompt(term)
    term.line("/remember off")
    term.expect(r"Memory off\.")
    prompt(term)
    term.line("A third one, not remembered")
    term.expect(r"\[recent:2 · 2 items · 2 earlier exchanges\]\n")
    prompt(term)
    term.line("/rate -1")
    term.expect(r"turn memory on \(--remember or /remember on\) before the answer\.")
    prompt(term)
    term.line("/reset")
    term.expect(r"Conversation cleared\.")
    prompt(term)
    term.line("/quit")
    assert term.close() == 0

    with _store(isolated_home, default_bundle) as store:
        answers = store.answers(USER)
        kinds = [item.kind for item in store.iter_items(USER)]
    assert [a.request for a in answers] == [
        "Write a commit subject for: fixed the cache key",
        "And one for: sped up the search",
    ]
    assert answers[0].rating == 1 and answers[0].edit == "fix: key the cache by content"
    assert answers[1].rating is None and answers[1].edit is None
    assert kinds == ["text", "text", "text", "turn", "edit", "turn"]
    listed = [
        json.loads(line)
        for line in edge_pllm(
            "--bundle", str(default_bundle), "items", USER, "--json", home=isolated_home
        ).splitlines()
    ]
    assert "A third one, not remembered" not in [i["text"] for i in listed]


def test_ctrl_c_ends_the_reply_not_the_session(chat, default_bundle: Path, isolated_home: Path):
    term = chat("-s", "recent:2", "-n", "600", "--remember")
    prompt(term)
    term.wait_reading()
    term.send(b"\x03")  # at the prompt: the line is dropped, and the way out is said
    term.expect(r"Ctrl-C again, /quit or Ctrl-D leaves")
    prompt(term)
    term.line("Write a very long story about a cache that forgot everything, in many chapters.")
    term.expect(r"\[recent:2 · 2 items\]\n")
    term.expect(r"\S")  # the reply is streaming
    term.send(b"\x03")
    term.expect(r"\[reply interrupted; not remembered\]")
    prompt(term)
    term.line("/rate +1")
    term.expect(r"interrupted, so it was not kept")
    prompt(term)
    term.line("/strategy nope")
    term.expect(r"nope")  # the library's sentence; the session goes on
    prompt(term)
    term.line("/strategy none")
    term.expect(r"Strategy none")
    prompt(term)
    term.line("Go on with the story.")
    # A next turn streams, with the interrupted exchange (what was shown) in the conversation.
    term.expect(r"\[none · 1 earlier exchange\]\n")
    term.expect(r"\S")
    term.send(b"\x03")
    term.expect(r"\[reply interrupted; not remembered\]")
    prompt(term)
    term.line("/bogus")
    term.expect(r"Unknown command /bogus")
    prompt(term)
    term.send(b"\x04")  # Ctrl-D at an empty prompt leaves
    assert term.close() == 0

    with _store(isolated_home, default_bundle) as store:
        assert store.answers(USER) == []
        assert [item.kind for item in store.iter_items(USER)] == ["text"] * 3


def test_the_oldest_exchanges_leave_a_conversation_that_no_longer_fits(chat):
    term = chat("-s", "recent:2", "-n", "8", n_ctx=256)
    long = " ".join(["the cache keeps every vector it has ever seen"] * 13)
    prompt(term)
    term.line(f"One: {long}")
    term.expect(r"\[recent:2 · 2 items\]\n")
    prompt(term)
    term.line(f"Two: {long}")
    term.expect(r"\(1 earlier exchange no longer fit the context and left the conversation\.\)")
    term.expect(r"\[recent:2 · 2 items\]\n")  # the history is back in, without turn One
    prompt(term)
    term.line("x" * 3000)  # the current turn alone does not fit: one sentence, nothing lost
    term.expect(r"The prompt needs \d+ tokens .* but the context holds 256")
    prompt(term)
    term.line("Three")
    term.expect(r"1 earlier exchange\]\n")  # turn Two is still in the conversation
    prompt(term)
    term.line("/quit")
    assert term.close() == 0
