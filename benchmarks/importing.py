"""Importing what a person keeps: throughput on a folder of mixed files, the re-import of
the unchanged folder, and whether a fact in a long note is found (before and after parts).

    .venv/bin/python -m benchmarks.importing          # also a section of `python -m benchmarks`

Texts are real commit bodies (the commit_subjects task); the facts are made up, one topic
each, so that a query names one note.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

import numpy as np

from edge_pllm import PersonalLLM, paths
from edge_pllm.defaults import ensure_default_bundle
from edge_pllm.storage.search import normalize

from .common import DATA, Results, Row, commit_texts
from .system import timed_process

PEOPLE = ["Ada", "Bruno", "Chen", "Dara", "Emil", "Fatou", "Goran", "Hana", "Ivo", "Jun"]
THINGS = ["bicycle lock code", "bakery", "train platform", "dentist", "wifi password"]


def mixed_folder(root: Path, texts: list[str], n: int) -> Path:
    """`n` files of four kinds (Markdown, HTML, mail, chat lines) from real texts."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        text = texts[i % len(texts)] + f"\n\n(file {i})"
        kind = i % 4
        if kind == 0:
            (root / f"note-{i}.md").write_text(f"# Note {i}\n\n{text}\n")
        elif kind == 1:
            html = "".join(f"<p>{p}</p>" for p in text.split("\n\n"))
            (root / f"page-{i}.html").write_text(f"<html><body>{html}</body></html>")
        elif kind == 2:
            mail = EmailMessage()
            mail["From"], mail["Subject"] = "me@example.org", f"Mail {i}"
            mail.set_content(text)
            (root / f"mail-{i}.eml").write_bytes(bytes(mail))
        else:
            lines = [{"role": "user", "content": line} for line in text.split("\n\n")]
            (root / f"chat-{i}.jsonl").write_text("\n".join(json.dumps(m) for m in lines))
    return root


def throughput(
    res: Results, bundle: Path, texts: list[str], n: int, tmp: Path, threads: int
) -> PersonalLLM:
    """`edge-pllm import` of a folder of `n` mixed files as a person runs it (a process of
    its own: start, imports, embedder, reading, embedding, storing), its wall time and peak
    RSS; then the same folder again, unchanged, in this process. Returns the runtime on
    the home the files went to."""
    folder = mixed_folder(tmp / "mixed", texts, n)
    home = tmp / "home"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(EDGE_PLLM_HOME=str(home), EDGE_PLLM_THREADS=str(threads))
    command = [sys.executable, "-m", "edge_pllm", "--bundle", str(bundle), "import", "mixed"]
    took, peak = timed_process([*command, str(folder), "--me", "me@example.org"], env)
    pllm = PersonalLLM(bundle, home=home)
    added = pllm.store.count("mixed")
    started = time.perf_counter()
    again = pllm.import_paths("mixed", [folder], me=["me@example.org"])
    took_again = time.perf_counter() - started
    assert added >= n and again.unchanged == n, (added, again)
    res.add(
        Row(
            "importing",
            f"edge-pllm import of {n} mixed files",
            n / took,
            "files/s",
            note="the whole command: process start, imports and the embedder's load",
        )
    )
    res.add(
        Row("importing", f"edge-pllm import of {n} mixed files: items", added / took, "items/s")
    )
    res.add(Row("importing", f"edge-pllm import of {n} mixed files: peak RSS", peak, "MiB"))
    res.add(
        Row(
            "importing",
            f"re-import of the {n} unchanged files",
            took_again,
            "s",
            "the first import",
            took,
            "≤ 0.1 ×",
            took_again <= 0.1 * took,
        )
    )  # fmt: skip
    return pllm


def long_notes(res: Results, pllm: PersonalLLM, texts: list[str], tmp: Path, n: int = 50) -> None:
    """`n` facts, each at the start, middle or end of a 2–10 KB note of real text, among
    500 other items; recall@3 of the note holding each fact, imported (one item, a vector
    for each part) against each note's one vector of its whole text (what the embedder
    reads of it: its first 256 tokens; all a note had before parts), searched exactly."""
    rng = random.Random(0)
    others = texts[-500:]
    facts = []
    folder = tmp / "long"
    folder.mkdir()
    for i in range(n):
        person, thing = PEOPLE[i % len(PEOPLE)], THINGS[i // len(PEOPLE) % len(THINGS)]
        value = f"{rng.randint(1000, 9999)} {rng.choice(['north', 'blue', 'old', 'corner'])}"
        fact = f"{person}'s {thing} is {value}."
        filler, size = [], rng.randint(2000, 10000)
        while sum(len(t) for t in filler) < size:
            filler.append(texts[rng.randrange(len(texts) - 500)])
        where = ("start", "middle", "end")[i % 3]
        at = {"start": 0, "middle": len(filler) // 2, "end": len(filler)}[where]
        body = "\n\n".join([*filler[:at], fact, *filler[at:]])
        (folder / f"note-{i}.md").write_text(body)
        facts.append((f"What is {person}'s {thing}?", i, where, body))
    pllm.add("notes", others)
    pllm.import_paths("notes", [folder])
    assert pllm.store.count("notes") == len(others) + n  # a note is one item
    whole = normalize(pllm.embedder.embed([*others, *(body for *_, body in facts)]))
    queries = normalize(pllm.embedder.embed([query for query, *_ in facts]))
    found: dict[tuple[str, str], list[bool]] = {}
    for (_, i, where, _), query in zip(facts, queries, strict=True):
        hits = pllm.search("notes", facts[i][0], 3)
        paths_found = [h.item.metadata.get("source", {}).get("path", "") for h in hits]
        mine = any(p.endswith(f"/note-{i}.md") for p in paths_found)
        found.setdefault((where, "parts"), []).append(mine)
        top = np.argsort(-(whole @ query), kind="stable")[:3]
        found.setdefault((where, "whole"), []).append(len(others) + i in top)
    for where in ("start", "middle", "end"):
        got, before = found[(where, "parts")], found[(where, "whole")]
        res.add(
            Row(
                "importing",
                f"recall@3 of a fact at the {where} of a long note",
                sum(got) / len(got),
                "",
                "one vector a note (no parts)",
                sum(before) / len(before),
                note=f"{len(got)} facts among {len(others)} other items",
            )
        )


def run(res: Results, bundle: Path, threads: int, n_files: int, data: Path = DATA) -> None:
    texts = commit_texts(max(n_files, 1500), data)
    with tempfile.TemporaryDirectory(prefix="edge-pllm-import-bench-") as tmp:
        pllm = throughput(res, bundle, texts, n_files, Path(tmp), threads)
        long_notes(res, pllm, texts, Path(tmp))
        pllm.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.importing", description=__doc__)
    parser.add_argument("--bundle", type=Path, help="bundle folder (default: the default one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--files", type=int, default=1000, help="files in the mixed folder")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args(argv)
    bundle = args.bundle or ensure_default_bundle(paths.home())
    run(Results(), bundle, args.threads, args.files, args.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
