"""The memory this process may use: the machine's, cut to its container's limit.

The search cache's default budget (`search.default_cache_budget`) is a share of it, so that
a laptop keeps a lifetime of history in memory while a phone-class device keeps less.
"""

from __future__ import annotations

import os
from pathlib import Path

SYSFS_CGROUP = Path("/sys/fs/cgroup")
_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a number near 2**63


def machine_ram() -> int | None:
    """The machine's physical memory in bytes; None where the OS does not say (Windows)."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def cgroup_ram_limit() -> int | None:
    """The bytes this process's cgroup may hold (v2's `memory.max`, v1's
    `memory.limit_in_bytes`, read at the mount's root: the container's own); None where
    there is no limit or no file to read."""
    for limit_file in (SYSFS_CGROUP / "memory.max", SYSFS_CGROUP / "memory/memory.limit_in_bytes"):
        try:
            text = limit_file.read_text().strip()
        except OSError:
            continue
        if text.isdecimal() and 0 < int(text) < _NO_LIMIT:
            return int(text)
        return None  # "max", or v1's no limit
    return None


def usable_ram() -> int | None:
    """The smaller of `machine_ram` and `cgroup_ram_limit`; None where neither is known."""
    bounds = [b for b in (machine_ram(), cgroup_ram_limit()) if b is not None]
    return min(bounds) if bounds else None
