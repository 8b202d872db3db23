"""The runtime runs on macOS and Windows too: no Linux-only call without a fallback."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from edge_pllm.cpus import llm_threads, parse_cpu_list, threads_per_core, usable_cpus
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


def test_without_a_topology_two_threads_per_core_are_assumed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("edge_pllm.cpus.usable_cpus", lambda: 8)
    monkeypatch.setattr("edge_pllm.cpus._SIBLINGS", Path("/nonexistent/siblings"))
    assert threads_per_core() == 2 and llm_threads() == (4, 8)  # cannot tell: as llama-cpp


def test_a_machine_without_smt_decodes_on_every_core(monkeypatch, tmp_path: Path):
    siblings = tmp_path / "thread_siblings_list"
    siblings.write_text("3\n")  # one hardware thread per core
    monkeypatch.setattr("edge_pllm.cpus._SIBLINGS", siblings)
    monkeypatch.setattr("edge_pllm.cpus.usable_cpus", lambda: 2)
    assert llm_threads() == (2, 2)
    siblings.write_text("0,8\n")  # two per core
    monkeypatch.setattr("edge_pllm.cpus.usable_cpus", lambda: 16)
    assert llm_threads() == (8, 16)


def test_the_model_gets_the_default_threads(default_bundle: Path):
    decode, prompt = llm_threads()
    model = LLM(default_bundle / "llm.gguf", LLMConfig(n_ctx=256))
    assert model.llama.context_params.n_threads == decode
    assert model.llama.context_params.n_threads_batch == prompt
    one = LLM(default_bundle / "llm.gguf", LLMConfig(n_ctx=256, n_threads=1))
    assert one.llama.context_params.n_threads == 1
