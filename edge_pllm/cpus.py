"""The CPUs this process may use, and how many threads each engine gets from them."""

from __future__ import annotations

import os
from pathlib import Path

SYSFS_CPUS = Path("/sys/devices/system/cpu")


def usable_cpus() -> int:
    """The logical CPUs this process may run on: its affinity mask where the OS has one
    (Linux), else every CPU (macOS and Windows lack `os.sched_getaffinity`)."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return len(affinity(0))
    return os.cpu_count() or 1


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


def llm_threads() -> tuple[int, int]:
    """(decode threads, prompt threads) for llama.cpp: one decode thread per physical core
    this process may use, every usable CPU for prompts. Where the cores cannot be counted
    (macOS, Windows, no sysfs), half the logical CPUs: llama-cpp-python's own default, which
    assumes two hardware threads per core and so leaves half the cores idle where there is
    one (most VMs, many laptops)."""
    logical = usable_cpus()
    cores = physical_cores()
    return max(1, cores if cores is not None else logical // 2), logical
