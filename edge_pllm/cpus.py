"""The CPUs this process may use, and how many threads each engine gets from them.

Three things bound them, the smallest wins: the CPUs the process may run on (its affinity
mask), the CPU time its container may spend (a cgroup quota, as `docker run --cpus 2` sets:
more threads than that only take turns), and the user's own cap (`--threads`, or
`EDGE_PLLM_THREADS`), for a machine shared with other work.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import InvalidInputError

SYSFS_CPUS = Path("/sys/devices/system/cpu")
SYSFS_CGROUP = Path("/sys/fs/cgroup")
ENV_THREADS = "EDGE_PLLM_THREADS"


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask where the OS has one (Linux), else
    every CPU (macOS and Windows lack `os.sched_getaffinity`), cut to its cgroup's CPU quota
    and to the user's cap (`thread_cap`)."""
    affinity = getattr(os, "sched_getaffinity", None)
    count = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    for bound in (cgroup_cpu_quota(), thread_cap()):
        if bound is not None:
            count = min(count, bound)
    return max(1, count)


def thread_cap() -> int | None:
    """The user's cap on threads, from `EDGE_PLLM_THREADS` (what `--threads` sets); None
    where it is unset."""
    text = os.environ.get(ENV_THREADS, "").strip()
    if not text:
        return None
    try:
        cap = int(text)
    except ValueError:
        cap = 0
    if cap < 1:
        raise InvalidInputError(
            f"{ENV_THREADS} must be a whole number of threads, 1 or more (got {text!r}).",
            field="threads",
        )
    return cap


def cgroup_cpu_quota() -> int | None:
    """The CPUs' worth of time this process's cgroup may spend, rounded up (cgroup v2's
    `cpu.max`, or v1's CFS quota and period, read where a container sees its own cgroup:
    the root of the mount); None where there is no quota or no cgroup file to read."""
    for quota_file, period_file in (
        (SYSFS_CGROUP / "cpu.max", None),
        (SYSFS_CGROUP / "cpu" / "cpu.cfs_quota_us", SYSFS_CGROUP / "cpu" / "cpu.cfs_period_us"),
    ):
        try:
            fields = quota_file.read_text().split()
            if period_file is not None:
                fields.append(period_file.read_text().strip())
            quota, period = fields[0], int(fields[1])
            if quota in ("max", "-1"):
                return None
            if int(quota) > 0 and period > 0:
                return max(1, math.ceil(int(quota) / period))
        except (OSError, ValueError, IndexError):
            continue
    return None


def parse_cpu_list(text: str) -> int:
    """How many CPUs a Linux cpulist names ("0-3,8" -> 5)."""
    count = 0
    for part in text.strip().split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def physical_cores() -> int | None:
    """The physical cores among the CPUs this process may run on: the distinct sibling
    sets Linux sysfs gives for them (so a cpuset of one hardware thread per core counts
    every core, and a hybrid CPU its P- and E-cores alike); None where it cannot tell."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is None:
        return None
    cores = set()
    try:
        for cpu in affinity(0):
            text = (SYSFS_CPUS / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text()
            parse_cpu_list(text)  # refuse what is not a cpulist
            cores.add(text.strip())
    except (OSError, ValueError):
        return None
    return len(cores) or None


def compute_threads() -> int:
    """Threads for work that keeps a core busy (decoding, running an ONNX graph): one per
    physical core this process may use, no more than `usable_cpus`. Where the cores cannot
    be counted (macOS, Windows, no sysfs), the user's cap if there is one, else half the
    logical CPUs: llama-cpp-python's own default, which assumes two hardware threads per
    core."""
    logical = usable_cpus()
    cores = physical_cores()
    if cores is None:
        cores = logical if thread_cap() is not None else logical // 2  # a cap says how many
    return max(1, min(cores, logical))


def llm_threads() -> tuple[int, int]:
    """(decode threads, prompt threads) for llama.cpp: `compute_threads` to decode (rather
    than llama-cpp-python's half the logical CPUs, which leaves half the cores idle where
    each has one thread: most VMs, many laptops), every usable CPU for prompts."""
    return compute_threads(), usable_cpus()
