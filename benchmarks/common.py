"""What every benchmark shares: timing, the machine's description, texts and synthetic users."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path

import numpy as np

from edge_pllm.cpus import llm_threads, usable_cpus
from edge_pllm.storage.parts import WHOLE_CHARS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "commit_subjects"
DATA_FILES = ("dev_questions.json", "test_questions.json")  # what commit_texts and queries read
START = datetime(2020, 1, 1, tzinfo=UTC)
CHAT_PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."


@dataclass
class Row:
    """One line of the report: a figure, the reference it is compared with, and the target."""

    section: str
    name: str
    value: float
    unit: str
    reference: str = ""
    ref_value: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ref_value in (None, 0):
            return None
        return self.value / self.ref_value  # type: ignore[operator]


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    plots: list[tuple[str, str]] = field(default_factory=list)  # (caption, file name)
    series: dict[str, dict] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        ratio = f"  ratio {row.ratio:.3f}" if row.ratio is not None else ""
        met = "" if row.met is None else ("  [met]" if row.met else "  [NOT met]")
        print(f"  {row.name}: {row.value:.4g} {row.unit}{ratio}{met}", flush=True)
        return row


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in ("llama-cpp-python", "onnxruntime", "sqlite-vec", "numpy", "torch")
    )
    return {
        "cpu": cpu,
        "usable CPUs (affinity, container quota, --threads)": str(usable_cpus()),
        "llama.cpp threads (decode, prompt) by default": ", ".join(map(str, llm_threads())),
        "memory": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
    }


def commit_texts(limit: int, data: Path = DATA) -> list[str]:
    """Distinct real commit bodies (profile texts of the dev and test splits)."""
    texts: dict[str, None] = {}
    for split in ("dev", "test"):
        for q in json.loads((data / f"{split}_questions.json").read_text()):
            for p in q["profile"]:
                if p["text"].strip():
                    texts[p["text"]] = None
                if len(texts) >= limit:
                    return list(texts)
    return list(texts)


def queries(n: int, data: Path = DATA) -> list[str]:
    """Real task inputs (commit bodies to title) from the dev split."""
    questions = json.loads((data / "dev_questions.json").read_text())
    return [q["input"] for q in questions[:n]]


def synthetic_history(
    base_texts: list[str], base_vectors: np.ndarray, n: int, seed: int = 0
) -> tuple[list[dict], np.ndarray]:
    """`n` distinct items built from real texts and their real vectors, jittered and
    renormalized, so large histories cost seconds instead of hours of embedding. Each text
    is cut to what its one vector reads (`parts.WHOLE_CHARS`): an item in parts would need
    a vector for each part (the importing section measures those)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(base_texts), n)
    keep = WHOLE_CHARS - 12  # room for the "(#n)" that makes each text distinct
    items = [
        {
            "text": f"{base_texts[j][:keep]}\n(#{i})",
            "created_at": (START + timedelta(minutes=i)).isoformat(),
        }
        for i, j in enumerate(picks)
    ]
    vectors = base_vectors[picks] + rng.normal(0, 0.02, (n, base_vectors.shape[1]))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return items, vectors.astype(np.float32)


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
