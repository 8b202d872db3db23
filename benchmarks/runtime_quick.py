"""Quick runtime figures: decode speed with and without a soft prefix against bare
llama-cpp-python on the same GGUF, and ingest throughput. Ratios are within one run.

    .venv/bin/python benchmarks/runtime_quick.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_pllm import paths
from edge_pllm.bundle import load_bundle
from edge_pllm.defaults import ensure_default_bundle
from edge_pllm.embedder import Embedder
from edge_pllm.llm import LLM, LLMConfig, SamplingConfig
from edge_pllm.store import HistoryStore

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "commit_subjects"
PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."


def bare_decode(model_path: Path, threads: int, tokens: list[int], max_tokens: int) -> float:
    import llama_cpp

    llama = llama_cpp.Llama(
        str(model_path), n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=threads, verbose=False
    )
    started = first = None
    n = 0
    started = time.perf_counter()
    for _ in llama.create_completion(
        tokens, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.1, stream=True
    ):
        first = first or time.perf_counter()
        n += 1
    return (n - 1) / (time.perf_counter() - first) if started and n > 1 else 0.0


def ours_decode(llm: LLM, prompt: str, soft: np.ndarray | None, max_tokens: int) -> float:
    sampling = SamplingConfig(max_tokens=max_tokens)
    n, first = 0, None
    for _ in llm.stream(prompt, soft=soft, sampling=sampling):
        first = first or time.perf_counter()
        n += 1
    return (n - 1) / (time.perf_counter() - first) if n > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--items", type=int, default=500)
    args = parser.parse_args()

    bundle = load_bundle(ensure_default_bundle(paths.home()))
    model_path = bundle.file(bundle.llm.file)
    llm = LLM(model_path, LLMConfig(n_threads=args.threads))
    prompt = llm.apply_chat_template([{"role": "user", "content": PROMPT}])
    tokens = llm.tokenize(prompt)
    soft = np.random.default_rng(0).normal(0, 0.02, (4, llm.n_embd)).astype(np.float32)

    runs: dict[str, list[float]] = {
        "bare llama-cpp-python": [],
        "edge-pllm none": [],
        "edge-pllm 4 soft tokens": [],
    }
    for _ in range(args.repeats):
        runs["bare llama-cpp-python"].append(
            bare_decode(model_path, args.threads, tokens, args.max_tokens)
        )
        runs["edge-pllm none"].append(ours_decode(llm, prompt, None, args.max_tokens))
        runs["edge-pllm 4 soft tokens"].append(ours_decode(llm, prompt, soft, args.max_tokens))
    ref = statistics.median(runs["bare llama-cpp-python"])
    results = {}
    print(
        f"decode tok/s, median of {args.repeats}, {args.threads} threads, {args.max_tokens} tokens"
    )
    for name, values in runs.items():
        med = statistics.median(values)
        results[name] = med
        print(f"  {name:26s} {med:7.1f} tok/s   ratio vs bare {med / ref:.3f}")

    questions = json.loads((DATA / "dev_questions.json").read_text())
    texts = list(dict.fromkeys(p["text"] for q in questions for p in q["profile"]))[: args.items]
    embedder = Embedder(
        bundle.file(bundle.embedder.file),
        bundle.file(bundle.embedder.tokenizer),
        bundle.embedder.config,
    )
    with tempfile.TemporaryDirectory() as tmp, HistoryStore(Path(tmp) / "b.db", embedder.dim) as s:
        started = time.perf_counter()
        vectors = embedder.embed(texts)
        embedded = time.perf_counter()
        s.add("bench", texts, vectors)
        stored = time.perf_counter()
    print(
        f"ingest of {len(texts)} commit bodies: embed {len(texts) / (embedded - started):.0f}"
        f" items/s, store {len(texts) / (stored - embedded):.0f} items/s,"
        f" end to end {len(texts) / (stored - started):.0f} items/s"
    )


if __name__ == "__main__":
    main()
