"""The device runtime never loads torch, transformers, optimum, sentence-transformers, the
workstation package (`export`) or a network client; its import graph has no cycle. The
checks read the installed `edge_pllm` (in CI's device environment, the wheel's copy, not
the checkout)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import edge_pllm

HEAVY = ("torch", "transformers", "optimum", "sentence_transformers", "export")
# Network clients (and `tokenizers`, which brings the model hub's): a device never goes online.
NETWORK = ("tokenizers", "huggingface_hub", "hf_xet", "httpx", "httpx2", "requests", "openai")
PACKAGE = Path(edge_pllm.__file__).resolve().parent


def test_no_module_of_the_runtime_imports_a_heavy_package():
    offenders = []
    modules = list(PACKAGE.rglob("*.py"))
    assert len(modules) > 15, f"found only {len(modules)} modules in {PACKAGE}"
    for path in modules:
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
for strategy in ("none", "recent", "rag", "plug", "plug+rag"):
    p.generate("u", "Write one line.", strategy=strategy, sampling=SamplingConfig(max_tokens=4))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {(*HEAVY, *NETWORK)!r})
unused = sorted(m for m in {sorted(OFF_THE_GENERATE_PATH)!r} if m in sys.modules)
print(json.dumps([heavy, unused]))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], []]


# Runtime modules that adding history and generating never need: imported lazily by the
# commands that do (evaluation, the server), they cost a generate process nothing.
OFF_THE_GENERATE_PATH = {
    "edge_pllm.tasks.lamp",
    "edge_pllm.tasks.metrics",
    "edge_pllm.evaluate",
}


def runtime_imports() -> dict[str, set[str]]:
    """The runtime's own import graph: module -> the edge_pllm modules it imports, at the top
    or inside functions (a lazy import is still a dependency), but not under
    `if TYPE_CHECKING:` (never executed). `edge_pllm` is the package's __init__."""
    modules = {
        ".".join(("edge_pllm", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(
            ".__init__"
        ): p
        for p in PACKAGE.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        skipped = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)
        }
        found: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                # `from pkg import sub` imports the submodule pkg.sub when there is one.
                found |= {
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                }
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_the_runtime_import_graph_has_no_cycle():
    graph = runtime_imports()
    assert (
        "edge_pllm.personalization.strategies" in graph["edge_pllm.personal"]
    )  # the graph sees imports
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*trail[trail.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*trail, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_head_does_not_import_the_strategies():
    graph = runtime_imports()
    reached, todo = set(), ["edge_pllm.personalization.head"]
    while todo:
        for dep in graph[todo.pop()] - reached:
            reached.add(dep)
            todo.append(dep)
    assert "edge_pllm.personalization.strategies" not in reached


def test_workstation_commands_join_the_cli_through_an_entry_point_without_torch():
    """`export` and `train-plug` come from the `edge_pllm.commands` entry point, so no file
    of the runtime names them; listing them (`edge-pllm --help`) imports no heavy package."""
    from importlib import metadata

    from edge_pllm.cli import COMMANDS_GROUP

    entries = {e.name: e.value for e in metadata.entry_points(group=COMMANDS_GROUP)}
    assert entries == {"export": "export.cli:register_commands"}
    script = """
import json, sys
import click
from edge_pllm.cli import cli
with click.Context(cli) as ctx:
    names = cli.list_commands(ctx)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "transformers", "optimum"})
print(json.dumps([names, heavy]))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    names, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"export", "train-plug", "ask", "setup"} <= set(names)
    assert heavy == []
    for path in PACKAGE.rglob("*.py"):
        assert "train_plug" not in path.read_text(), path.name


def test_a_request_that_embeds_nothing_loads_no_onnx_model(default_bundle, tmp_path):
    """`none` and `recent` need neither the embedder nor the head: onnxruntime stays out of
    the process (#35: what a request does not need is not loaded for it); `rag` loads it."""
    from edge_pllm import PersonalLLM

    with PersonalLLM(default_bundle, home=tmp_path) as pllm:
        pllm.add("u", ["a first note about caching", "a second note about parsing"])
    script = f"""
import json, sys
from edge_pllm import PersonalLLM, SamplingConfig
p = PersonalLLM({str(default_bundle)!r}, home={str(tmp_path)!r})
seen = []
for strategy in ("none", "recent", "rag"):
    p.generate("u", "Write one line.", strategy=strategy, sampling=SamplingConfig(max_tokens=2))
    seen.append("onnxruntime" in sys.modules)
print(json.dumps(seen))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, False, True]
