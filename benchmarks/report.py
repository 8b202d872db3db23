"""docs/BENCHMARKS.md and its plots from one run's Results."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from .common import Results

SECTIONS = {
    "throughput": (
        "Decode and prompt throughput (same GGUF, same threads, same prompt)",
        "A 128-token greedy generation of one chat prompt, median of the repeats, variants "
        "interleaved; bare llama-cpp-python with flash attention on, as edge-pllm runs it. "
        "Prompt throughput is prompt tokens over the time to the first token, so for "
        "edge-pllm it includes the persona computation and the soft-token decode.",
    ),
    "persona": (
        "Time to first token and the persona computation vs history size",
        "Real task prompts (commit messages to title, up to 256 embedder tokens); histories "
        "are real commit embeddings, jittered to reach the larger sizes. The persona "
        "computation is embedding the request, reading the user's vectors and running the "
        "head; its projection of the history is cached per user until the history changes. "
        "TTFT medians, strategies interleaved per prompt, KV cache reuse off.",
    ),
    "consensus": (
        "Consensus against one greedy answer",
        "Seconds per answer on real commit-subject prompts (one-line answers, at most 48 "
        "tokens) for a user of 1,000 history items, median over the prompts, every call "
        "from an empty KV cache, variants interleaved per prompt. `consensus` prepares its "
        "member's prompt (`plug+rag:1`) and decodes its 10 candidates side by side, one "
        "llama.cpp batch per step, one row for candidates still alike.",
    ),
    "ingest": (
        "Ingest",
        "The same real commit bodies through each engine, interleaved in chunks.",
    ),
    "knn": (
        "KNN search (rag) vs history size",
        "Per query, within one user's partition, exact. The numpy reference holds the user's "
        "matrix in memory already; the runtime reads it into memory on the first search (its "
        "own row) and keeps it within the store's cache budget, appending the user's new "
        "items; a user whose matrix is over the budget is searched by sqlite-vec in the "
        "database file.",
    ),
    "process": (
        "Whole process (fresh child processes)",
        "From spawning `python` to the first token of a 32-token generation; peak RSS is "
        "the child's VmHWM.",
    ),
    "serving": (
        "The server under load",
        "`edge-pllm serve` on loopback: while 4 chat requests generate (one at a time: one "
        "llama.cpp context), the GETs that need no model are timed back to back, and two "
        "streaming clients with memory on leave after their first chunk.",
    ),
    "importing": (
        "Importing what a person keeps",
        "`edge-pllm import USER FOLDER` as a person runs it, a process of its own (start,"
        " imports, the embedder's load, reading, embedding, storing; its peak RSS from "
        "the OS), on Markdown, HTML, mail and chat-line files of real commit texts; then "
        "the same folder again, unchanged, in the benchmark's process. Long notes: 50 "
        "made-up facts, each at the start, middle or end of a 2–10 KB note of real text, "
        "among 500 other items; recall@3 of the note, imported (one item, a vector for "
        "each part) against one vector a note (the embedder reads its first 256 tokens: "
        "all a note had before parts).",
    ),
    "limit": (
        "The physical limit of decode",
        "Decoding reads every weight once per token, so memory bandwidth / model size "
        "bounds tokens/s on this machine.",
    ),
}


def plot(res: Results, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    table = res.series.get("ttft_by_history")
    if table:
        sizes = sorted(table)
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for key in ("ttft none", "ttft plug", "ttft rag:1", "ttft plug+rag:1"):
            left.plot(sizes, [table[n][key] for n in sizes], marker="o", label=key[5:])
        left.set(xscale="log", xlabel="history items", ylabel="ms", title="Time to first token")
        left.set_ylim(bottom=0)
        left.legend()
        bottom = [0.0] * len(sizes)
        for key in ("embed query", "read vectors", "head"):
            values = [table[n][key] for n in sizes]
            right.bar([f"{n:,}" for n in sizes], values, bottom=bottom, label=key)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        right.set(xlabel="history items", ylabel="ms", title="Persona computation per request")
        right.legend()
        fig.tight_layout()
        fig.savefig(folder / "ttft.png", dpi=110)
        plt.close(fig)
        res.plots.append(("TTFT and persona computation vs history size", "ttft.png"))
    knn = res.series.get("knn")
    if knn:
        sizes = sorted(knn)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        lines = (
            ("search", "edge-pllm search", "-"),
            ("numpy", "numpy", "-"),
            ("first search", "edge-pllm, first search", ":"),
        )
        for key, label, style in lines:
            ax.plot(sizes, [knn[n][key] for n in sizes], style, marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="history items", ylabel="ms per query")
        ax.set_title("KNN search, k=5")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "knn.png", dpi=110)
        plt.close(fig)
        res.plots.append(("KNN latency vs history size", "knn.png"))


def markdown(res: Results, machine: dict[str, str], command: str, plots_rel: str) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Every ratio is "
        "against a reference measured in the same run, on the same machine; absolute figures "
        "move with the machine's load, ratios much less.",
        "",
        "**Machine:** "
        + "; ".join(f"{k}: {v}" for k, v in machine.items() if k != "packages")
        + f".  \n**Packages:** {machine['packages']}.",
        "",
    ]
    for section, (title, method) in SECTIONS.items():
        rows = [r for r in res.rows if r.section == section]
        if not rows:
            continue
        lines += [
            f"## {title}",
            "",
            method,
            "",
            "| Figure | Value | Reference | Ratio | Target | Met |",
            "|---|---:|---|---:|---|:---:|",
        ]
        for r in rows:
            ref = f"{r.reference} ({r.ref_value:.4g} {r.unit})" if r.reference else ""
            ratio = f"{r.ratio:.3f}" if r.ratio is not None else ""
            met = "" if r.met is None else ("yes" if r.met else "**no**")
            lines.append(
                f"| {r.name} | {r.value:.4g} {r.unit} | {ref} | {ratio} | {r.target} | {met} |"
            )
        lines.append("")
        for caption, name in res.plots:
            if (section == "persona" and name == "ttft.png") or (
                section == "knn" and name == "knn.png"
            ):
                lines += [f"![{caption}]({plots_rel}/{name})", ""]
    return "\n".join(lines)
