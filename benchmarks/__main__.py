"""Run every benchmark and regenerate docs/BENCHMARKS.md with its plots.

    .venv/bin/python -m benchmarks            # histories up to 1,000,000 items (~25 min, 2 cores)
    .venv/bin/python -m benchmarks --quick    # up to 10,000 items, fewer repeats (~5 min)

Needs the `bench` extra (matplotlib, and sentence-transformers as the ingest reference), and
the commit_subjects task (`../shared/data/commit_subjects`, or `--data DIR`): its real commits
are the prompts and histories.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

from edge_pllm import PersonalLLM, paths
from edge_pllm.defaults import ensure_default_bundle
from edge_pllm.inference.llm import LLMConfig
from edge_pllm.tasks.lamp import task_spec

from . import generation, importing, retrieval, serving, system
from .common import (
    DATA,
    DATA_FILES,
    ROOT,
    Results,
    commit_texts,
    machine,
    queries,
    synthetic_history,
)
from .report import markdown, plot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller histories, fewer repeats")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: checks that every step runs (CI)"
    )
    parser.add_argument("--bundle", type=Path, help="bundle folder (default: the default one)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument(
        "--data", type=Path, default=DATA, help=f"the commit_subjects task folder (default: {DATA})"
    )
    args = parser.parse_args(argv)
    missing = [name for name in DATA_FILES if not (args.data / name).is_file()]
    if missing:
        parser.error(
            f"{args.data} lacks {', '.join(missing)}: the commit_subjects task's real commits "
            "are the prompts and histories; pass its folder with --data."
        )
    if args.smoke:
        sizes, repeats, n_prompts, n_texts, max_tokens = [10, 200], 1, 2, 40, 8
    elif args.quick:
        sizes, repeats, n_prompts, n_texts, max_tokens = [10, 1_000, 10_000], 3, 6, 300, 128
    else:
        sizes, repeats, n_prompts, n_texts, max_tokens = (
            [10, 1_000, 10_000, 100_000, 1_000_000],
            5,
            12,
            1000,
            128,
        )
    big = 10_000 if 10_000 in sizes else sizes[-1]  # history of the whole-process figures
    mid = 1_000 if 1_000 in sizes else sizes[-1]  # of the throughput and repeat-query ones

    import llama_cpp

    bundle = args.bundle or ensure_default_bundle(paths.home())
    res = Results()
    spec = task_spec("commit_subject")
    prompts = [spec.query(q) for q in queries(n_prompts, args.data)]
    with tempfile.TemporaryDirectory(prefix="edge-pllm-bench-") as tmp:
        home = Path(tmp)
        config = LLMConfig(n_threads=args.threads, prefix_cache=False)
        pllm = PersonalLLM(bundle, home=home, llm_config=config)
        if pllm.plug is None:
            print("The default bundle has no Persona-Plug head; run `edge-pllm setup`.")
            return 2

        texts = commit_texts(n_texts, args.data)
        vectors = retrieval.ingest(res, pllm.embedder, texts, args.threads)
        retrieval.store_insert(res, pllm.embedder.dim, texts, vectors, 10 * n_texts)

        users = {}
        for n in sizes:
            users[n] = f"history-{n}"
            items, vecs = synthetic_history(texts, vectors, n, seed=n)
            for start in range(0, n, 5000):
                pllm.store.add(users[n], items[start : start + 5000], vecs[start : start + 5000])
            del items, vecs  # 1,000,000 items take about 2 GB here
            print(f"  user {users[n]}: {n:,} items", flush=True)

        model = pllm.bundle.file(pllm.bundle.llm.file)
        bare = llama_cpp.Llama(
            str(model),
            n_ctx=config.n_ctx,
            n_batch=config.n_batch,
            n_ubatch=config.n_batch,
            n_threads=args.threads,
            flash_attn=True,
            verbose=False,
        )  # fmt: skip  (the attention kernel edge-pllm runs: the persona's cost alone)
        bare_tps = generation.throughput(res, pllm, bare, users[mid], 2 * repeats - 1, max_tokens)
        del bare
        generation.ttft_by_history(res, pllm, users, prompts, passes=1 if args.smoke else 2)
        generation.short_request_persona(
            res, pllm, users[mid], mid, " ".join(queries(4, args.data))
        )
        query_vecs = np.stack([pllm.embedder.embed_one(p) for p in prompts])
        retrieval.knn(res, pllm.store, users, query_vecs)
        pllm.close()
        del pllm  # one llama.cpp context at a time keeps the timings clean

        cached = PersonalLLM(bundle, home=home, llm_config=LLMConfig(n_threads=args.threads))
        generation.repeat_query(res, cached, users[mid], prompts[: max(repeats, 2)])
        generation.consensus_cost(res, cached, users[mid], prompts, spec.style)
        cached.close()
        del cached

        system.process_figures(
            res, model, bundle, home, (big, users[big]), prompts[0], args.threads, min(repeats, 3)
        )
        system.ask_process(
            res, model, bundle, home, users[mid], prompts[0], args.threads, 1 if args.smoke else 5
        )
        serving.under_load(res, bundle, args.threads, max_tokens=max_tokens // 2)
        importing.run(res, bundle, args.threads, 40 if args.smoke else 1000, args.data)
        system.decode_limit(res, model, args.threads, bare_tps)

    plots = args.out.parent / "benchmarks"
    plot(res, plots)
    command = (
        "python -m benchmarks"
        + (" --quick" if args.quick else "")
        + (" --smoke" if args.smoke else "")
        + ("" if args.data == DATA else f" --data {shlex.quote(str(args.data))}")
    )
    args.out.write_text(markdown(res, machine(), command, plots.name) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
