"""The runtime runs on macOS and Windows too: no Linux-only call without a fallback."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from edge_pllm.cpus import llm_threads, parse_cpu_list, usable_cpus
from edge_pllm.llm import LLM, LLMConfig

PACKAGE = Path(__file__).resolve().parents[1] / "edge_pllm"
LINUX_ONLY_MODULES = {"fcntl", "resource", "termios", "pwd", "grp"}
LINUX_ONLY_CALLS = {"sched_getaffinity", "fork", "getuid", "geteuid", "statvfs", "setsid"}


def test_cpu_count_falls_back_where_there_is_no_affinity(monkeypatch: pytest.MonkeyPatch):
    if hasattr(os, "sched_getaffinity"):
        assert usable_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert usable_cpus() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "undeterminable"
    assert usable_cpus() == 1


def test_the_runtime_calls_no_linux_only_api_directly():
    """`os.sched_getaffinity` and friends only through getattr with a fallback; no
    POSIX-only modules; no /proc reads."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                offenders += [
                    f"{where} import {a.name}" for a in node.names if a.name in LINUX_ONLY_MODULES
                ]
            elif isinstance(node, ast.ImportFrom) and node.module in LINUX_ONLY_MODULES:
                offenders.append(f"{where} from {node.module}")
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
                and node.attr in LINUX_ONLY_CALLS
            ):
                offenders.append(f"{where} os.{node.attr}")
            elif (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.startswith("/proc/")
            ):
                offenders.append(f"{where} {node.value}")
    assert offenders == []


@pytest.mark.parametrize("text,count", [("0", 1), ("0-1", 2), ("0,4", 2), ("0-3,8-9,12\n", 7)])
def test_cpu_lists_are_counted(text: str, count: int):
    assert parse_cpu_list(text) == count


def fake_topology(root: Path, siblings: dict[int, str]) -> None:
    for cpu, text in siblings.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "thread_siblings_list").write_text(text + "\n")


@pytest.mark.parametrize(
    "allowed,siblings,decode",
    [
        ({0, 1}, {0: "0", 1: "1"}, 2),  # no SMT (this kind of VM): every core decodes
        (set(range(4)), {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"}, 2),  # SMT: one per core
        ({0, 1}, {0: "0,2", 1: "1,3"}, 2),  # a cpuset of one thread from each of 2 cores
        ({0, 1, 2}, {0: "0-1", 1: "0-1", 2: "2"}, 2),  # a P-core with 2 threads, an E-core
    ],
)
def test_decode_threads_are_one_per_physical_core(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, allowed, siblings, decode
):
    fake_topology(tmp_path, siblings)
    monkeypatch.setattr("edge_pllm.cpus.SYSFS_CPUS", tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: allowed, raising=False)
    assert llm_threads() == (decode, len(allowed))


@pytest.mark.parametrize("siblings", [None, "garbage"])
def test_without_a_topology_half_the_cpus_decode(monkeypatch, tmp_path: Path, siblings):
    if siblings is not None:
        fake_topology(tmp_path, {0: siblings})
    monkeypatch.setattr("edge_pllm.cpus.SYSFS_CPUS", tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert llm_threads() == (1, 1)
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows: llama-cpp-python's default
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert llm_threads() == (4, 8)


def test_the_model_gets_the_default_threads(default_bundle: Path, monkeypatch):
    monkeypatch.setattr("edge_pllm.llm.llm_threads", lambda: (3, 5))  # no library's default
    model = LLM(default_bundle / "llm.gguf", LLMConfig(n_ctx=256))
    assert model.llama.context_params.n_threads == 3
    assert model.llama.context_params.n_threads_batch == 5
    one = LLM(default_bundle / "llm.gguf", LLMConfig(n_ctx=256, n_threads=1))
    assert one.llama.context_params.n_threads == 1
