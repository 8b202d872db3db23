"""The runtime runs on macOS and Windows too: no Linux-only call without a fallback."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from edge_pllm.embedder import usable_cpus

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
