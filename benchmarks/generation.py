"""Generation with a persona against bare llama-cpp-python: throughput, time to first token
at growing history sizes with the persona computation broken out, repeat-query reuse of
the KV cache, and what `consensus` costs against one greedy answer."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from edge_pllm import PersonalLLM
from edge_pllm.decoding.consensus import Consensus
from edge_pllm.decoding.decoders import Drawer, Drawn
from edge_pllm.inference.llm import SamplingConfig
from edge_pllm.personalization.prompts import PromptStyle

from .common import CHAT_PROMPT, Results, Row

STRATEGIES = ("none", "plug", "plug+rag:1")
APART = "plug (request apart)"
TTFT_STRATEGIES = ("none", "plug", "rag:1", "plug+rag:1")


@dataclass
class Run:
    prompt_tokens: int
    ttft: float  # call to first token, seconds
    decode_tps: float  # tokens/s after the first


def bare_run(llama, tokens: list[int], max_tokens: int) -> Run:
    """One greedy generation with llama-cpp-python alone, from an empty KV cache."""
    llama.reset()
    started = time.perf_counter()
    first = last = None
    for _ in llama.create_completion(
        tokens, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.1, stream=True
    ):
        last = time.perf_counter()
        first = first or last
    generated = llama.n_tokens - len(tokens) + 1
    return _run(len(tokens), started, first, last, generated)


def ours_run(pllm: PersonalLLM, user: str, prompt: str, strategy: str, max_tokens: int) -> Run:
    """One generation through PersonalLLM.stream: persona, prompt, soft tokens, decode. The
    prompt's length is counted after the clock stops, as bare_run's tokens are made before
    it starts."""
    seen = []
    sampling = SamplingConfig(max_tokens=max_tokens)
    started = time.perf_counter()
    first = last = None
    for _ in pllm.stream(
        user, prompt, strategy=strategy, sampling=sampling, on_prepared=seen.append
    ):
        last = time.perf_counter()
        first = first or last
    soft = seen[0].personalization.soft_tokens
    n = len(pllm.llm.tokenize(seen[0].prompt)) + (0 if soft is None else len(soft))
    generated = pllm.llm.llama.n_tokens - n + 1
    return _run(n, started, first, last, generated)


def _run(n_prompt: int, started: float, first, last, generated: int) -> Run:
    if first is None:
        raise RuntimeError("The model produced no token; cannot time it.")
    decode = (generated - 1) / (last - first) if generated > 1 and last > first else 0.0
    return Run(n_prompt, first - started, decode)


def ttft(pllm: PersonalLLM, user: str, prompt: str, strategy: str) -> float:
    """Seconds from the call to the first streamed piece of text."""
    started = time.perf_counter()
    stream = pllm.stream(user, prompt, strategy=strategy, sampling=SamplingConfig(max_tokens=8))
    next(stream)
    elapsed = time.perf_counter() - started
    stream.close()
    return elapsed


def throughput(
    res: Results, pllm: PersonalLLM, bare, user: str, repeats: int, max_tokens: int
) -> float:
    """Decode and prompt throughput of every persona strategy against bare llama-cpp-python
    on the same prompt text (plug+rag's carries the retrieved item; soft tokens, which bare
    llama-cpp-python cannot take, are the only difference); returns bare decode tokens/s."""
    print("decode and prompt throughput", flush=True)
    sampling = SamplingConfig(max_tokens=max_tokens)
    prompt_ids = {
        s: pllm.llm.tokenize(pllm.prepare(user, CHAT_PROMPT, s, sampling).prompt)
        for s in STRATEGIES
    }
    runs: dict[str, list[Run]] = {}
    for s in STRATEGIES:
        runs[s], runs[f"bare:{s}"] = [], []
    runs[APART] = []
    names = list(runs)
    invariant = pllm.llm._rows_batch_invariant
    for r in range(repeats):  # interleaved and rotated: drift hits every variant alike
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name.startswith("bare:"):
                runs[name].append(bare_run(bare, prompt_ids[name[5:]], max_tokens))
                continue
            # APART: the request in a pass of its own, then the soft rows and the header.
            pllm.llm.__dict__["_rows_batch_invariant"] = invariant and name != APART
            strategy = name.split(" ")[0]
            runs[name].append(ours_run(pllm, user, CHAT_PROMPT, strategy, max_tokens))
    pllm.llm.__dict__["_rows_batch_invariant"] = invariant
    med = {k: _median_run(v) for k, v in runs.items()}
    for s in STRATEGIES:
        ref, ours = med[f"bare:{s}"], med[s]
        reference = f"bare llama-cpp-python, same {ref.prompt_tokens}-token prompt"
        res.add(
            Row(
                "throughput",
                f"decode, edge-pllm {s}",
                ours.decode_tps,
                "tok/s",
                reference,
                ref.decode_tps,
                "≥ 0.98 × bare",
                ours.decode_tps >= 0.98 * ref.decode_tps,
            )
        )
        prompt_tps, prompt_ref = ours.prompt_tokens / ours.ttft, ref.prompt_tokens / ref.ttft
        res.add(
            Row(
                "throughput",
                f"prompt eval incl. persona, edge-pllm {s} ({ours.prompt_tokens} tokens)",
                prompt_tps,
                "tok/s",
                reference,
                prompt_ref,
                "≥ 0.97 × bare",
                prompt_tps >= 0.97 * prompt_ref,
            )
        )
    apart, one = med[APART], med["plug"]
    res.add(
        Row(
            "throughput",
            f"prompt eval incl. persona, edge-pllm plug ({one.prompt_tokens} tokens), the "
            "whole prompt in one pass",
            one.prompt_tokens / one.ttft,
            "tok/s",
            "the request in a pass of its own, then the soft rows and the header",
            apart.prompt_tokens / apart.ttft,
        )
    )
    return med["bare:none"].decode_tps


def _median_run(runs: list[Run]) -> Run:
    return Run(
        runs[0].prompt_tokens,
        statistics.median(r.ttft for r in runs),
        statistics.median(r.decode_tps for r in runs),
    )


def persona_breakdown(pllm: PersonalLLM, user: str, prompts: list[str]) -> dict[str, float]:
    """Median milliseconds of each persona step over `prompts`."""
    plug = pllm.plug
    steps: dict[str, list[float]] = {"embed query": [], "read vectors": [], "head": [], "knn": []}
    for prompt in prompts:
        t0 = time.perf_counter()
        q = pllm.embedder.embed_one(prompt)
        t1 = time.perf_counter()
        _, history = pllm.store.vectors(user, limit=plug.max_history)
        t2 = time.perf_counter()
        plug.soft_tokens(prompt if plug.reads_text else q, history)
        t3 = time.perf_counter()
        pllm.store.search(user, q, 1)
        t4 = time.perf_counter()
        for name, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            steps[name].append(dt * 1000)
    out = {k: statistics.median(v) for k, v in steps.items()}
    out["persona"] = out["embed query"] + out["read vectors"] + out["head"]
    return out


def ttft_by_history(
    res: Results, pllm: PersonalLLM, users: dict[int, str], prompts: list[str], passes: int
):
    """TTFT of plain vs persona prompts, and the persona steps, as the history grows."""
    print("time to first token vs history size", flush=True)
    table: dict[int, dict[str, float]] = {}
    for n, user in sorted(users.items()):
        row = persona_breakdown(pllm, user, prompts)
        times: dict[str, list[float]] = {s: [] for s in TTFT_STRATEGIES}
        for p in prompts * passes:
            for s in TTFT_STRATEGIES:  # interleaved: drift hits every strategy alike
                times[s].append(ttft(pllm, user, p, s))
        for s, values in times.items():
            row[f"ttft {s}"] = statistics.median(values) * 1000
        table[n] = row
        print(f"  {n:>7} items: " + ", ".join(f"{k} {v:.1f} ms" for k, v in row.items()))
    res.series["ttft_by_history"] = table
    targets = {1_000: 5.0, 100_000: 30.0}
    for n, row in table.items():
        limit = targets.get(n)
        res.add(
            Row(
                "persona",
                f"persona computation at {n:,} items (embed {row['embed query']:.1f} + read "
                f"{row['read vectors']:.1f} + head {row['head']:.1f} ms)",
                row["persona"],
                "ms",
                target=f"≤ {limit:g} ms" if limit else "",
                met=row["persona"] <= limit if limit else None,
            )
        )
    for n, row in table.items():
        for s, base in (("plug", "none"), ("plug+rag:1", "rag:1")):
            overhead = row[f"ttft {s}"] / row[f"ttft {base}"]
            gated = n == 1_000 and s == "plug"
            res.add(
                Row(
                    "persona",
                    f"TTFT with {s} at {n:,} items",
                    row[f"ttft {s}"],
                    "ms",
                    f"the same prompt without soft tokens ({base})",
                    row[f"ttft {base}"],
                    "≤ 1.05 × plain" if gated else "",
                    overhead <= 1.05 if gated else None,
                )
            )


def short_request_persona(
    res: Results, pllm: PersonalLLM, user: str, n_items: int, long_text: str
) -> None:
    """The persona computation for a short chat request, where embedding the request is
    cheap (the task prompts above are whole commit messages, up to 256 tokens); then
    embedding time by length, cut from `long_text`."""
    row = persona_breakdown(pllm, user, [CHAT_PROMPT] * 20)
    n_tokens = pllm.embedder.count_tokens(CHAT_PROMPT)
    res.add(
        Row(
            "persona",
            f"persona computation at {n_items:,} items, a {n_tokens}-token chat request "
            f"(embed {row['embed query']:.1f} + read {row['read vectors']:.2f} + head "
            f"{row['head']:.2f} ms)",
            row["persona"],
            "ms",
            target="≤ 5 ms" if n_items == 1_000 else "",
            met=row["persona"] <= 5 if n_items == 1_000 else None,
        )
    )
    embed_by_length(res, pllm, long_text)


EMBED_LENGTHS = (16, 32, 64, 128, 256)


def embed_by_length(res: Results, pllm: PersonalLLM, text: str, repeats: int = 15) -> None:
    """What stands between a real task request and a ≤ 5 ms persona: embedding the request,
    timed at growing token counts (the leading words of `text`), lengths interleaved."""
    count = pllm.embedder.count_tokens
    words = text.split()
    texts = {}
    for n in EMBED_LENGTHS:
        w = 1
        while w < len(words) and count(" ".join(words[:w])) < n:
            w += 1
        texts[count(" ".join(words[:w]))] = " ".join(words[:w])
    times: dict[int, list[float]] = {n: [] for n in texts}
    for _ in range(repeats + 1):  # the first pass warms up
        for n, t in texts.items():
            started = time.perf_counter()
            pllm.embedder.embed_one(t)
            times[n].append(time.perf_counter() - started)
    for n, values in times.items():
        res.add(
            Row("persona", f"embed a {n}-token request", statistics.median(values[1:]) * 1000, "ms")
        )


def repeat_query(res: Results, pllm: PersonalLLM, user: str, prompts: list[str]):
    """TTFT of a prompt whose persona prefix and text are still in the KV cache vs one that
    must be computed from scratch (the previous call had another prompt)."""
    print("repeat-query TTFT (KV cache prefix reuse)", flush=True)
    cold, warm = [], []
    for a, b in zip(prompts, prompts[1:] + prompts[:1], strict=True):
        ttft(pllm, user, b, "plug")
        cold.append(ttft(pllm, user, a, "plug"))
        warm.append(ttft(pllm, user, a, "plug"))
    c, w = statistics.median(cold) * 1000, statistics.median(warm) * 1000
    res.add(
        Row(
            "persona",
            "repeat-query TTFT, plug, prefix in KV cache",
            w,
            "ms",
            "same prompt, recomputed",
            c,
            "≤ 0.5 × recomputed",
            w <= 0.5 * c,
        )
    )


class _OneAtATime(Drawer):
    """Draws a member's candidates one after another (consensus before one batch per step);
    `alone`: each from an empty KV cache, as if it were the only answer asked for."""

    def __init__(self, llm, alone: bool = False):
        super().__init__(llm)
        self.alone = alone

    def answers_each(self, asks, style):
        return [[self._one(prepared, s, style) for s in samplings] for prepared, samplings in asks]

    def _one(self, prepared, sampling, style):
        if self.alone:
            self.llm.reset()
        return self.answer(prepared, sampling, style)


@dataclass(frozen=True)
class SequentialConsensus(Consensus):
    """`consensus` with its candidates drawn one at a time: the reference of one batch. A
    candidate after the first reuses the cached prompt but for its last token, which it
    decodes alone: a one-row pass whose logits can differ in the last bits from the
    prompt's own pass, so an answer can part from the batch's; `alone` draws each
    candidate from an empty cache (its time is not reported: the check that the batch
    draws the very answers)."""

    name: str = "consensus, one at a time"
    alone: bool = False

    def draw(self, drawer: Drawer, *args) -> Drawn:  # type: ignore[override]
        return super().draw(_OneAtATime(drawer.llm, self.alone), *args)


def consensus_cost(
    res: Results, pllm: PersonalLLM, user: str, prompts: list[str], style: PromptStyle
) -> None:
    """Seconds per answer of `consensus` (its candidates in one batch per step) against one
    greedy answer of each member and against the same consensus drawn one candidate at a
    time, on real task prompts; each call from an empty KV cache, the variants interleaved
    per prompt; on how many prompts the batch's answer is each candidate's drawn alone (an
    empty cache each) and the one drawn one at a time reusing the prompt."""
    print("consensus against one greedy answer", flush=True)
    pool = Consensus()
    sampling = SamplingConfig(max_tokens=48)
    variants: dict[str, str | Consensus] = {m: m for m in pool.members}
    variants |= {"consensus": "consensus", "sequential": SequentialConsensus()}
    variants["alone"] = SequentialConsensus(alone=True)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    same = same_alone = 0
    for prompt in prompts:
        texts = {}
        for name, spec in variants.items():
            pllm.llm.reset()
            started = time.perf_counter()
            answer = pllm.generate(user, prompt, strategy=spec, sampling=sampling, style=style)
            seconds[name].append(time.perf_counter() - started)
            texts[name] = answer.text
        same += texts["consensus"] == texts["sequential"]
        same_alone += texts["consensus"] == texts["alone"]
    ms = {name: statistics.median(s) * 1000 for name, s in seconds.items()}
    agree = (
        f"the same answer as each candidate drawn alone on {same_alone} of {len(prompts)} "
        f"prompts, as one at a time reusing the prompt on {same}"
    )
    members = len(pool.members)
    shape = f"{members} member{'s' * (members > 1)} × {pool.samples + 1} candidates"
    longest = pool.members[-1]  # with the retrieved item: the target's reference
    for i, member in enumerate(reversed(pool.members)):
        gated = member == longest
        res.add(
            Row(
                "consensus",
                f"consensus ({shape}, one batch per step), {agree}"
                if i == 0
                else f"consensus against one greedy answer of {member}",
                ms["consensus"],
                "ms",
                f"one greedy answer, {member}"
                + (" (its longest prompt)" if gated and members > 1 else ""),
                ms[member],
                "≤ 1.5 × one greedy answer" if gated else "",
                ms["consensus"] <= 1.5 * ms[member] if gated else None,
            )
        )
    res.add(
        Row(
            "consensus",
            "consensus, one batch per step, against the same drawn one at a time",
            ms["consensus"],
            "ms",
            "consensus, candidates one at a time",
            ms["sequential"],
        )
    )
