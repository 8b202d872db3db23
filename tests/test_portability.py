"""The runtime runs on macOS and Windows too: no Linux-only call without a fallback."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_pllm import cpus
from edge_pllm.cli import cli
from edge_pllm.cpus import cgroup_cpu_quota, llm_threads, parse_cpu_list, usable_cpus
from edge_pllm.errors import InvalidInputError
from edge_pllm.inference.llm import LLM, LLMConfig
from edge_pllm.personal import PersonalLLM

PACKAGE = Path(__file__).resolve().parents[1] / "edge_pllm"
LINUX_ONLY_MODULES = {"fcntl", "resource", "termios", "pwd", "grp"}
LINUX_ONLY_CALLS = {"sched_getaffinity", "fork", "getuid", "geteuid", "statvfs", "setsid"}


@pytest.fixture(autouse=True)
def no_cgroup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cgroup mount: the machine's own quota, if any, stays out of these tests."""
    root = tmp_path / "cgroup"
    root.mkdir()
    monkeypatch.setattr(cpus, "SYSFS_CGROUP", root)
    return root


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
    monkeypatch.setattr(
        "edge_pllm.inference.llm.llm_threads", lambda: (3, 5)
    )  # no library's default
    model = LLM(default_bundle / "llm.gguf", LLMConfig(n_ctx=256))
    assert model.llama.context_params.n_threads == 3
    assert model.llama.context_params.n_threads_batch == 5
    one = LLM(default_bundle / "llm.gguf", LLMConfig(n_ctx=256, n_threads=1))
    assert one.llama.context_params.n_threads == 1


@pytest.mark.parametrize(
    "files,quota",
    [
        ({"cpu.max": "max 100000\n"}, None),  # cgroup v2, no limit
        ({"cpu.max": "250000 100000\n"}, 2),  # `docker run --cpus 2.5`: 2 threads
        ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU: still one
        ({"cpu.max": "max 100000\n", "cpu/cpu.cfs_quota_us": "100000"}, None),  # v2 first
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "200000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 2),
        ({"cpu.max": "0 100000\n"}, None),
        ({"cpu.max": "garbage"}, None),
        ({}, None),  # no cgroup files (macOS, Windows)
    ],
)
def test_a_container_quota_bounds_the_cpus(monkeypatch, no_cgroup: Path, files, quota):
    for name, text in files.items():
        (no_cgroup / name).parent.mkdir(exist_ok=True)
        (no_cgroup / name).write_text(text)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(cpus, "physical_cores", lambda: 8)
    assert cgroup_cpu_quota() == quota
    assert usable_cpus() == (quota or 16)
    assert llm_threads() == (min(8, quota or 16), quota or 16)


def test_the_user_caps_the_threads(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(cpus, "physical_cores", lambda: 8)
    monkeypatch.setenv(cpus.ENV_THREADS, "3")
    assert llm_threads() == (3, 3)
    monkeypatch.setenv(cpus.ENV_THREADS, "12")  # a cap only lowers: still one per core
    assert llm_threads() == (8, 12)
    monkeypatch.setattr(cpus, "physical_cores", lambda: None)  # cores unknown: half, capped
    assert llm_threads() == (8, 12)
    monkeypatch.setenv(cpus.ENV_THREADS, "3")
    assert llm_threads() == (3, 3)
    for bad in ("0", "-2", "two", "1.5", str(cpus.MAX_THREADS + 1)):
        monkeypatch.setenv(cpus.ENV_THREADS, bad)
        with pytest.raises(InvalidInputError, match="EDGE_PLLM_THREADS must be a whole number"):
            usable_cpus()


def test_libraries_keep_their_own_count_only_where_nothing_is_known(monkeypatch):
    monkeypatch.setattr(cpus, "physical_cores", lambda: None)
    assert cpus.library_threads() == 0  # onnxruntime's and torch's own defaults
    monkeypatch.setenv(cpus.ENV_THREADS, "1")
    assert cpus.library_threads() == 1
    monkeypatch.delenv(cpus.ENV_THREADS)
    monkeypatch.setattr(cpus, "physical_cores", lambda: 1)
    assert cpus.library_threads() == 1


def test_a_thread_cap_reaches_every_engine(default_bundle: Path, isolated_home: Path, monkeypatch):
    """Capped at 1: llama.cpp decodes and prefills on one thread, and the embedder's and
    the head's onnxruntime sessions run one."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setenv(cpus.ENV_THREADS, "1")
    with PersonalLLM(default_bundle, home=isolated_home, llm_config=LLMConfig(n_ctx=256)) as p:
        assert p.llm.llama.context_params.n_threads == 1
        assert p.llm.llama.context_params.n_threads_batch == 1
        assert p.plug is not None
        for session in (p.embedder._session, p.plug._session):
            assert session.get_session_options().intra_op_num_threads == 1


def test_threads_on_the_command_line(default_bundle: Path, monkeypatch):
    """`--threads` caps the command it is given to (status shows the counts), and no more:
    the process's environment is as it was afterwards."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(cpus, "physical_cores", lambda: 4)
    runner = CliRunner()
    bundle = ["--bundle", str(default_bundle)]
    capped = runner.invoke(cli, ["--threads", "1", *bundle, "status"])
    assert capped.exit_code == 0, capped.output
    assert "threads:   llama.cpp 1 decode, 1 prompt; embedder and head 1; bound 1" in capped.output
    assert cpus.ENV_THREADS not in os.environ
    free = runner.invoke(cli, [*bundle, "status"])
    assert "threads:   llama.cpp 4 decode, 4 prompt; embedder and head 4; bound none" in free.output
    refused = runner.invoke(cli, ["--threads", "0", "path"])
    assert refused.exit_code == 2 and "--threads" in refused.output
    from_env = runner.invoke(cli, ["path"], env={cpus.ENV_THREADS: "0"})
    assert from_env.exit_code == 2 and "--threads" in from_env.output
