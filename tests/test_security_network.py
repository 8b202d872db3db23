"""Guarantee 1, no network at run time: ingest, generation with every strategy, a user's
export and the server's request handling open no outbound connection and look up no name.

In-process, every socket connect/sendto, `create_connection` and name lookup to a
non-loopback address fails loudly and is counted (the count must stay 0). Out of process,
the CLI runs in a network namespace with no interfaces (`unshare -n`) under `strace`, which
also sees connections that native code (llama.cpp, onnxruntime) would open: it must make
no `connect` at all and still succeed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_pllm import LLMConfig, PersonalLLM, SamplingConfig
from edge_pllm.cli import cli

from .security_support import NetworkGuard, asgi_request

ALICE = ["fix(parser): handle blank lines", "docs: explain the cache", "feat: add json flag"]
BOB = ["Apple pie needs cinnamon.", "Sourdough starter: feed twice a day."]
STRATEGIES = ["none", "recent:2", "rag:2", "plug", "plug+rag:2"]


def test_the_guard_catches_what_it_should():
    guard = NetworkGuard()
    original = socket.socket.connect
    with guard.active():
        with pytest.raises(OSError, match="network access attempted"):
            socket.create_connection(("192.0.2.1", 9), timeout=1)  # TEST-NET-1: never sent
        with pytest.raises(OSError, match="network access attempted"):
            socket.getaddrinfo("example.com", 443)
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s,
            pytest.raises(OSError, match="network access attempted"),
        ):
            s.sendto(b"x", ("192.0.2.1", 9))
        with socket.socket() as s:  # loopback is allowed (the local server)
            s.bind(("127.0.0.1", 0))
            s.listen()
            with socket.create_connection(s.getsockname(), timeout=5):
                pass
    assert len(guard.attempts) == 3 and guard.loopback >= 1
    assert socket.socket.connect is original  # restored


def exercise_everything(bundle: Path, home: Path, tmp_path: Path, full: bool) -> int:
    """Ingest, generate with every strategy, export, serve and the CLI; returns how many
    operations ran. `full` also streams every strategy and runs every endpoint variant."""
    from edge_pllm.server import ServerConfig, create_app

    operations = 0
    with PersonalLLM(bundle, home=home, llm_config=LLMConfig(n_ctx=1024, n_threads=1)) as pllm:
        pllm.add("alice", ALICE)  # ingest: embed + store
        pllm.add("bob", BOB)
        operations += 2
        strategies = STRATEGIES if pllm.plug is not None else STRATEGIES[:3]
        sampling = SamplingConfig(max_tokens=2)
        for strategy in strategies:
            pllm.generate("alice", "Write a commit subject.", strategy=strategy, sampling=sampling)
            operations += 1
            if full:
                "".join(pllm.stream("bob", "A recipe?", strategy=strategy, sampling=sampling))
                operations += 1

        app = create_app(pllm, ServerConfig(default_strategy="rag:2"))
        calls = [
            ("GET", "/v1/models", None, ""),
            ("POST", "/v1/users/carol/history", {"items": ["tax return", "dentist"]}, ""),
            ("GET", "/v1/users/carol/history", None, ""),
            ("GET", "/v1/users/carol/search", None, "q=teeth&k=1"),
            ("GET", "/v1/users/carol/export", None, ""),  # a user's export
            ("DELETE", "/v1/users/carol", None, ""),
        ]
        variants = [("/v1/chat/completions", False), ("/v1/chat/completions", True)]
        variants.append(("/v1/completions", False))
        for i, strategy in enumerate(strategies):
            if not full and i % 2:  # fast: 3 generations over the 3 endpoint variants
                continue
            for path, stream in variants if full else [variants[i // 2 % len(variants)]]:
                body: dict = {"user": "alice", "max_tokens": 2, "stream": stream}
                body["edge_pllm"] = {"strategy": strategy}
                if "chat" in path:
                    body["messages"] = [{"role": "user", "content": "Say hi."}]
                else:
                    body["prompt"] = "Say hi."
                calls.append(("POST", path, body, ""))
        for method, path, body, query in calls:
            reply = asgi_request(app, method, path, json_body=body, query=query)
            assert reply.status_code < 300, (path, reply.text)
            operations += 1

    # The CLI: add, ingest (a LaMP file), ask, search, dump (a user's export), forget.
    lamp = tmp_path / "dev_questions.json"
    profile = [{"title": "T1", "text": "body one", "date": "2020-01-01"}]
    lamp.write_text(json.dumps([{"id": "q1", "input": "x", "profile": profile}]))
    steps = [
        ["add", "dora", "fix: typo", "feat: flag"],
        ["ingest", str(lamp), "--task", "LaMP_4"],
        ["dump", "dora", "-o", str(tmp_path / "dora.jsonl")],
    ]
    if full:
        steps += [
            ["ask", "dora", "Write a subject.", "-n", "2", "-s", "rag:1"],
            ["search", "dora", "typo"],
            ["forget", "dora", "--yes"],
        ]
    runner = CliRunner()
    for args in steps:
        result = runner.invoke(cli, ["--bundle", str(bundle), "--n-ctx", "1024", *args])
        assert result.exit_code == 0, result.output
        operations += 1
    return operations


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_runtime_cli_and_server_make_no_outbound_connection(
    default_bundle: Path, isolated_home: Path, tmp_path: Path, report_counts, full: bool
):
    pytest.importorskip("starlette")
    guard = NetworkGuard()
    with guard.active():
        operations = exercise_everything(default_bundle, isolated_home, tmp_path, full)
    assert guard.attempts == [], guard.attempts
    report_counts(
        f"{operations} runtime/CLI/server operations under the socket guard, outbound "
        f"connection attempts and name lookups: {len(guard.attempts)}"
    )


def test_onnxruntime_telemetry_is_off_before_onnxruntime_loads():
    """onnxruntime's 1DS telemetry (mobile.events.data.microsoft.com) is read from the
    environment when onnxruntime is imported: edge_pllm must set it first (the runtime
    imports onnxruntime when it opens its first session)."""
    code = (
        "import os, sys\n"
        "seen = []\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'onnxruntime':\n"
        "            seen.append(os.environ.get('ORT_DISABLE_TELEMETRY'))\n"
        "sys.meta_path.insert(0, Watch())\n"
        "from edge_pllm import PersonalLLM\n"
        "import edge_pllm.inference.embedder, edge_pllm.personalization.head\n"
        "from edge_pllm.inference.onnx_session import open_session\n"
        "try:\n"
        "    open_session('missing.onnx')\n"
        "except Exception:\n"
        "    pass\n"
        "print(seen)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "['1']", out.stdout + out.stderr
    late = "import onnxruntime, warnings; warnings.simplefilter('error'); import edge_pllm"
    out = subprocess.run([sys.executable, "-c", late], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "telemetry stays on" in out.stderr


def _netns_available() -> str | None:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return "needs Linux with unshare(1)"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
        if probe.returncode != 0:
            return f"unshare -n is not permitted here ({probe.stderr.decode().strip()})"
        return None
    return None


@pytest.mark.skipif(_netns_available() is not None, reason=str(_netns_available()))
@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_cli_in_a_network_namespace_without_routes(
    default_bundle: Path, isolated_home: Path, tmp_path: Path, report_counts, full: bool
):
    unshare = ["unshare", "-n"]
    if subprocess.run([*unshare, "true"], capture_output=True).returncode != 0:
        unshare = ["unshare", "-rn"]
    strace = shutil.which("strace")
    exe = str(Path(sys.executable).with_name("edge-pllm"))
    base = [exe, "--bundle", str(default_bundle), "--home", str(isolated_home), "--n-ctx", "1024"]
    steps = [
        ["add", "erin", "fix: handle empty config", "docs: explain the cache flag"],
        ["ask", "erin", "Write a commit subject.", "-n", "3", "-s", "rag:2"],
        ["ask", "erin", "Write a commit subject.", "-n", "3", "-s", "plug+rag:1"],
        ["dump", "erin", "-o", str(tmp_path / "erin.jsonl")],
        ["forget", "erin", "--yes"],
    ]
    if not full:  # one run that loads everything: embedder, store, plug head, llama.cpp
        steps = [steps[0], steps[2], steps[3]]
    connects: list[str] = []
    for i, step in enumerate(steps):
        trace = tmp_path / f"trace{i}.txt"
        command = [*unshare, *base, *step]
        if strace:
            command = [
                *unshare,
                strace,
                "-f",
                "-qq",
                "-e",
                "trace=connect,sendto,sendmsg",
                "-o",
                str(trace),
                *base,
                *step,
            ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if "plug" in " ".join(step) and "no Persona-Plug head" in result.stderr:
            continue
        assert result.returncode == 0, result.stderr
        if strace:
            for line in trace.read_text().splitlines():
                if "AF_INET" in line:  # AF_INET and AF_INET6 (netlink/unix are local)
                    connects.append(line)
    assert connects == [], connects
    assert (tmp_path / "erin.jsonl").read_text().count("\n") == 2
    how = "under strace: 0 connect/sendto/sendmsg to an IP address" if strace else "no strace"
    report_counts(f"{len(steps)} CLI runs in a network namespace with no routes; {how}")
