"""The CPUs this process may use, and how many threads each engine gets from them."""

from __future__ import annotations

import os
from pathlib import Path

_SIBLINGS = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")


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


def threads_per_core() -> int:
    """Hardware threads per core, from Linux sysfs; 2 where it cannot tell (the assumption
    llama-cpp-python makes everywhere)."""
    try:
        return max(1, parse_cpu_list(_SIBLINGS.read_text()))
    except (OSError, ValueError):
        return 2


def llm_threads() -> tuple[int, int]:
    """(decode threads, prompt threads) for llama.cpp: one decode thread per physical core
    this process may use, every usable CPU for prompts. llama-cpp-python's own default, half
    the logical CPUs, assumes two hardware threads per core: where there is one (most VMs,
    many laptops) it leaves half the cores idle while decoding."""
    logical = usable_cpus()
    return max(1, logical // threads_per_core()), logical
