"""Whole-process figures (peak RSS, cold start to first token) measured in fresh child
processes, and the machine's memory bandwidth as the physical limit of decode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .common import Results, Row

# Each child prints one JSON line: seconds from its parent's spawn to the first token, and
# its peak RSS. The parent's clock reading travels in argv.
_BARE = """
import json, sys, time
t0 = float(sys.argv[1])
import llama_cpp
from benchmarks.common import peak_rss_mb
llm = llama_cpp.Llama(sys.argv[2], n_ctx=2048, n_batch=512, n_ubatch=512,
                      n_threads=int(sys.argv[3]), flash_attn=True, verbose=False)
tokens = llm.tokenize(sys.argv[4].encode(), special=True)  # a templated text's markers too
first = None
for _ in llm.create_completion(tokens, max_tokens=32, temperature=0.0, stream=True):
    first = first or time.time()
n_prompt = len(tokens)
print(json.dumps({"first_token_s": first - t0, "peak_rss_mb": peak_rss_mb(), "n_prompt": n_prompt}))
"""

_OURS = """
import json, sys, time
t0 = float(sys.argv[1])
from edge_pllm import PersonalLLM
from edge_pllm.inference.llm import LLMConfig, SamplingConfig
from benchmarks.common import peak_rss_mb
pllm = PersonalLLM(sys.argv[2], home=sys.argv[5], llm_config=LLMConfig(n_threads=int(sys.argv[3])))
first = None
seen = []
for _ in pllm.stream(sys.argv[6], sys.argv[4], strategy=sys.argv[7],
                     sampling=SamplingConfig(max_tokens=32), on_prepared=seen.append):
    first = first or time.time()
soft = seen[0].personalization.soft_tokens
n_prompt = len(pllm.llm.tokenize(seen[0].prompt)) + (0 if soft is None else len(soft))
print(json.dumps({"first_token_s": first - t0, "peak_rss_mb": peak_rss_mb(), "n_prompt": n_prompt,
                  "prompt": seen[0].prompt}))
"""


def _child(script: str, *args: str) -> dict[str, float]:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-c", script, str(t0), *args],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=root,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def process_figures(
    res: Results,
    model: Path,
    bundle: Path,
    home: Path,
    history: tuple[int, str],
    prompt: str,
    threads: int,
    repeats: int,
) -> None:
    """Peak RSS and cold start of a whole generate process: edge-pllm (plug+rag, a user with
    `history` = (items, name)) vs bare llama-cpp-python on the same GGUF."""
    print("whole process: peak RSS and cold start", flush=True)
    n_items, user = history
    # Two references: bare llama-cpp-python given the request alone, and given the very text
    # edge-pllm prefills (templated request and retrieved item; all but the soft tokens), so
    # the ratio to the second is what the runtime itself adds.
    bare, same, ours = [], [], []
    for _ in range(repeats):
        bare.append(_child(_BARE, str(model), str(threads), prompt))
        ours.append(_child(_OURS, str(bundle), str(threads), prompt, str(home), user, "plug+rag:1"))
        same.append(_child(_BARE, str(model), str(threads), ours[-1]["prompt"]))

    def med(runs: list[dict[str, float]], key: str) -> float:
        return float(np.median([r[key] for r in runs]))

    rss, rss_ref = med(ours, "peak_rss_mb"), med(bare, "peak_rss_mb")
    res.add(
        Row(
            "process",
            f"peak RSS, generate with plug+rag at {n_items:,} items",
            rss,
            "MiB",
            "bare llama-cpp-python",
            rss_ref,
            "≤ 1.3 × bare",
            rss <= 1.3 * rss_ref,
        )
    )
    cold = med(ours, "first_token_s")
    for refs, what, target in (
        (same, "the same prompt text", "≤ 1.5 × bare"),
        (bare, "the request alone", ""),
    ):
        ref = med(refs, "first_token_s")
        res.add(
            Row(
                "process",
                "cold start to first token (process start, imports, load, persona, prefill; "
                f"{ours[0]['n_prompt']:.0f} prompt tokens vs {refs[0]['n_prompt']:.0f})",
                cold * 1000,
                "ms",
                f"bare llama-cpp-python, {what}",
                ref * 1000,
                target,
                cold <= 1.5 * ref if target else None,
            )
        )


def memory_bandwidth(threads: int, mib: int = 512) -> float:
    """Copy bandwidth in GB/s (bytes read + written), best of 5, over `threads` threads."""
    n = mib * 2**20 // 8 // threads
    srcs = [np.ones(n) for _ in range(threads)]
    dsts = [np.empty(n) for _ in range(threads)]
    best = float("inf")
    for _ in range(5):
        workers = [
            threading.Thread(target=np.copyto, args=(d, s)) for s, d in zip(srcs, dsts, strict=True)
        ]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - started)
    return 2 * n * 8 * threads / best / 1e9


def decode_limit(res: Results, model: Path, threads: int, measured_tps: float) -> None:
    """Decode reads every weight once per token: bandwidth / model bytes bounds tokens/s."""
    print("memory bandwidth (decode's physical limit)", flush=True)
    bw = max(memory_bandwidth(1), memory_bandwidth(threads))
    size = model.stat().st_size
    limit = bw * 1e9 / size
    res.add(Row("limit", "memory copy bandwidth (numpy, read + write)", bw, "GB/s"))
    res.add(
        Row(
            "limit",
            f"model bytes read per token (GGUF file, {size / 2**20:.0f} MiB)",
            size / 2**20,
            "MiB",
        )
    )
    res.add(
        Row(
            "limit",
            "decode tok/s, bare llama-cpp-python",
            measured_tps,
            "tok/s",
            "bandwidth / model bytes",
            limit,
        )
    )


# The reference for `edge-pllm ask`: what a person would write with llama-cpp-python alone,
# the same GGUF, request and answer length (the chat template adds the same system turn).
_BARE_CHAT = """
import sys
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=2048, n_batch=512, n_threads=int(sys.argv[4]), flash_attn=True,
            verbose=False)
out = llm.create_chat_completion([{"role": "user", "content": sys.argv[2]}],
                                 max_tokens=int(sys.argv[3]), temperature=0.0)
print(out["choices"][0]["message"]["content"])
"""


# Runs a command and reports its wall time and peak RSS. A small process of its own: Linux
# gives a child the peak RSS of the process it was forked from as its starting point, and
# the benchmark's process holds a million vectors.
_MEASURE = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"rc": done.returncode, "wall": wall, "peak": peak,
                  "stderr": done.stderr.decode(errors="replace")[-2000:]}))
"""


def timed_process(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of a whole child process, from the OS's accounting."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, env=env, check=True
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    if found["rc"] != 0:
        raise RuntimeError(f"{argv[:4]} failed: {found['stderr']}")
    return found["wall"], found["peak"]


def ask_process(
    res: Results,
    model: Path,
    bundle: Path,
    home: Path,
    user: str,
    request: str,
    threads: int,
    pairs: int,
) -> None:
    """`edge-pllm ask USER REQUEST -s S -n 8` as a person runs it (start, imports, load,
    persona, prefill, 8 tokens) against bare llama-cpp-python's chat completion of the same
    request, run in turn, pair by pair; for `none` and `plug`. Bytecode is written on a
    first run of each (as an installed package has it)."""
    print("whole process: edge-pllm ask vs a bare chat completion", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(EDGE_PLLM_HOME=str(home), EDGE_PLLM_THREADS=str(threads))
    bare = [sys.executable, "-c", _BARE_CHAT, str(model), request, "8", str(threads)]
    for strategy in ("none", "plug"):
        ours = [sys.executable, "-m", "edge_pllm", "--bundle", str(bundle), "ask", user, request]
        ours += ["-s", strategy, "-n", "8"]
        timed_process(ours, env), timed_process(bare, env)  # warm-up: bytecode, page cache
        runs = [(timed_process(ours, env), timed_process(bare, env)) for _ in range(pairs)]
        wall = float(np.median([o[0] / b[0] for o, b in runs]))
        peak = float(np.median([o[1] for o, _ in runs]))
        peak_ref = float(np.median([b[1] for _, b in runs]))
        ms = float(np.median([o[0] for o, _ in runs])) * 1000
        ms_ref = float(np.median([b[0] for _, b in runs])) * 1000
        res.add(
            Row(
                "process",
                f"edge-pllm ask -s {strategy} -n 8, whole process (median of {pairs} "
                f"pairs; ratio {wall:.2f} pair by pair)",
                ms,
                "ms",
                "bare llama-cpp-python chat completion, same request",
                ms_ref,
                "≤ 1.3 × bare",
                wall <= 1.3,
            )
        )
        res.add(
            Row(
                "process",
                f"edge-pllm ask -s {strategy} -n 8, peak RSS",
                peak,
                "MiB",
                "bare llama-cpp-python chat completion, same request",
                peak_ref,
                "≤ 1.3 × bare",
                peak <= 1.3 * peak_ref,
            )
        )
