"""The CPUs this process may use, and how many threads each engine gets from them.

Three things bound them, the smallest wins: the CPUs the process may run on (its affinity
mask), the CPU time its container may spend (a cgroup quota, as `docker run --cpus 2` sets:
more threads than that only take turns), and the user's own cap (`--threads`, or
`EDGE_PLLM_THREADS`), for a machine shared with other work. A bound only ever lowers a
count.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InvalidInputError

SYSFS_CPUS = Path("/sys/devices/system/cpu")
SYSFS_CGROUP = Path("/sys/fs/cgroup")
ENV_THREADS = "EDGE_PLLM_THREADS"
MAX_THREADS = 4096


def machine_cpus() -> int:
    """The logical CPUs this process may run on: its affinity mask where the OS has one
    (Linux), else every CPU (macOS and Windows lack `os.sched_getaffinity`)."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return len(affinity(0))
    return os.cpu_count() or 1


def cpu_bound() -> int | None:
    """The smaller of the container's quota and the user's cap; None where neither is set."""
    bounds = [b for b in (cgroup_cpu_quota(), thread_cap()) if b is not None]
    return min(bounds) if bounds else None


def usable_cpus() -> int:
    """The CPUs this process may use: `machine_cpus` cut to `cpu_bound`."""
    bound = cpu_bound()
    count = machine_cpus()
    return max(1, count if bound is None else min(count, bound))


def thread_cap() -> int | None:
    """The user's cap on threads, from `EDGE_PLLM_THREADS` (what `--threads` sets); None
    where it is unset."""
    text = os.environ.get(ENV_THREADS, "").strip()
    if not text:
        return None
    if not text.isdecimal() or not 1 <= int(text) <= MAX_THREADS:
        raise InvalidInputError(
            f"{ENV_THREADS} must be a whole number of threads from 1 to {MAX_THREADS} "
            f"(got {text!r}).",
            field="threads",
        )
    return int(text)


def cgroup_cpu_quota() -> int | None:
    """The whole CPUs' worth of time this process's cgroup may spend (at least 1; a
    fraction is dropped, as Go's automaxprocs does: one thread too many thrashes, llama.cpp's
    threads spin at their barriers), from cgroup v2's `cpu.max` or v1's CFS quota and
    period; None where there is no quota or no file to read. Read at the root of the
    mount, which is the process's own cgroup in a container (Docker, Kubernetes); a quota
    set on the host (systemd's CPUQuota=) or on a parent cgroup is not seen."""
    candidates = [(SYSFS_CGROUP / "cpu.max", None)] + [
        (SYSFS_CGROUP / v1 / "cpu.cfs_quota_us", SYSFS_CGROUP / v1 / "cpu.cfs_period_us")
        for v1 in ("cpu", "cpu,cpuacct")
    ]
    for quota_file, period_file in candidates:
        try:
            fields = quota_file.read_text().split()
            if period_file is not None:
                fields.append(period_file.read_text().strip())
            quota, period = fields[0], int(fields[1])
            if quota in ("max", "-1"):
                return None
            if int(quota) > 0 and period > 0:
                return max(1, int(quota) // period)
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
    physical core this process may use, within `cpu_bound`. Where the cores cannot be
    counted (macOS, Windows, no sysfs), half the logical CPUs: llama-cpp-python's own
    default, which assumes two hardware threads per core."""
    cores = physical_cores()
    if cores is None:
        cores = machine_cpus() // 2
    return max(1, min(cores, usable_cpus()))


def library_threads() -> int:
    """The thread count to give a library that counts cores itself (onnxruntime, torch):
    0, its own default, unless the cores can be counted here or a bound applies (its
    count ignores container quotas and the user's cap; onnxruntime's also the affinity
    mask)."""
    if physical_cores() is None and cpu_bound() is None:
        return 0
    return compute_threads()


def llm_threads() -> tuple[int, int]:
    """(decode threads, prompt threads) for llama.cpp: `compute_threads` to decode (rather
    than llama-cpp-python's half the logical CPUs, which leaves half the cores idle where
    each has one thread: most VMs, many laptops), every usable CPU for prompts."""
    return compute_threads(), usable_cpus()
