"""The device runtime never loads torch, transformers, optimum or sentence-transformers."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "transformers", "optimum", "sentence_transformers")
PACKAGE = Path(__file__).resolve().parents[1] / "edge_pllm"


def test_no_module_of_the_runtime_imports_a_heavy_package():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in HEAVY]
    assert offenders == []


def test_import_and_generation_load_no_heavy_package(default_bundle, tmp_path):
    script = f"""
import json, sys
from edge_pllm import PersonalLLM, SamplingConfig
p = PersonalLLM({str(default_bundle)!r}, home={str(tmp_path)!r})
p.add("u", ["a first note about caching", "a second note about parsing"])
for strategy in ("none", "recent", "rag"):
    p.generate("u", "Write one line.", strategy=strategy, sampling=SamplingConfig(max_tokens=4))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print(json.dumps(heavy))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
