"""The benchmark suite runs end to end (tiny sizes) and writes its report: it must not rot
between the on-demand full runs that regenerate docs/BENCHMARKS.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# As benchmarks.common says; not imported: the device CI runs a copy of tests/ alone.
DATA = ROOT.parent / "shared" / "data" / "commit_subjects"
DATA_FILES = ("dev_questions.json", "test_questions.json")


@pytest.mark.slow
@pytest.mark.skipif(
    not all((DATA / name).is_file() for name in DATA_FILES),
    reason="shared/data/commit_subjects is not beside the repo",
)
def test_benchmarks_smoke_run_writes_every_section(default_bundle, tmp_path: Path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sentence_transformers")
    out = tmp_path / "docs" / "BENCHMARKS.md"
    command = ["-m", "benchmarks", "--smoke", "--bundle", str(default_bundle), "--out", str(out)]
    command += ["--data", str(DATA)]
    subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
        timeout=900,
    )
    report = out.read_text()
    for heading in ("Decode and prompt throughput", "Time to first token", "Ingest", "KNN",
                    "Whole process", "physical limit", "under load", "Importing"):  # fmt: skip
        assert heading in report, heading
    assert "bare llama-cpp-python" in report and "sentence-transformers fp32" in report
    for plot in ("ttft.png", "knn.png"):
        assert (out.parent / "benchmarks" / plot).stat().st_size > 1000
