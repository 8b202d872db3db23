"""Consensus decoding: several personalized answers, and the one the others agree with most.

A small model's single greedy answer is a noisy draw. `consensus` asks the model several
times — its member strategy's greedy answer plus sampled ones (fixed seeds, so the result
is reproducible) — and returns the candidate with the highest summed unigram F1 (ROUGE-1)
against all the others: minimum-Bayes-risk selection under the task's own metric. The
candidates are decoded side by side (`LLM.draw`): the prompt's keys and values computed
once and shared, one llama.cpp batch per step for all of them (one row for candidates that
sampled alike so far), each candidate the very answer it would be drawn alone with one
decode thread.

Its one member is `plug+rag:1`: with the shipped head, ten candidates of that one prompt
scored as well as five each of `plug` and `plug+rag:1` on dev, at one prompt's cost instead
of two that share nothing (docs/EVAL.md). `consensus-beam` keeps the two members and
replaces each one's greedy answer by the best of a beam search (`beam.py`, 4 wide) for
one-line answers: better on dev, not on test, at about twice the time (docs/EVAL.md), so
it is not the default. On one KV sequence a beam's cost grows with the square of the
answer's length, so a longer answer keeps its greedy one.

Spec strings: `consensus` (`plug+rag:1`, greedy and DEFAULT_SAMPLES samples),
`consensus:N` (N samples), and `consensus-beam[:N]` (`plug` and `plug+rag:1`, N samples
each, 4 by default).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import InvalidInputError
from .beam import MAX_WIDTH

if TYPE_CHECKING:
    from ..inference.llm import SamplingConfig
    from ..personalization.prompts import PromptStyle
    from .drawer import Drawer, Drawn, Prepared

DEFAULT_MEMBERS = ("plug+rag:1",)
DEFAULT_SAMPLES = 9
BEAM_MEMBERS = ("plug", "plug+rag:1")  # consensus-beam's, as docs/EVAL.md measured it
BEAM_SAMPLES = 4
TEMPERATURE = 0.8  # of the sampled candidates
BEAM_WIDTH = 4  # of each member's first candidate in `consensus-beam`
MAX_SAMPLES = 16

_TOKEN = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Consensus:
    """Answer with each of `members` (the best of a beam search `beam_width` wide; 1, or
    an answer longer than one line: greedy) plus `samples` sampled answers each, then
    return the candidate that agrees most with the rest (`choose`)."""

    samples: int = DEFAULT_SAMPLES
    members: tuple[str, ...] = DEFAULT_MEMBERS
    temperature: float = TEMPERATURE
    beam_width: int = 1
    name: str = "consensus"
    streams: bool = field(default=False, init=False)  # the answer is chosen whole

    def __post_init__(self) -> None:
        if not 0 <= self.samples <= MAX_SAMPLES:
            raise InvalidInputError(
                f"consensus takes 0..{MAX_SAMPLES} samples per member (got {self.samples}).",
                field="strategy",
            )
        if not 1 <= self.beam_width <= MAX_WIDTH:
            raise InvalidInputError(
                f"consensus takes a beam width of 1..{MAX_WIDTH} (got {self.beam_width}).",
                field="strategy",
            )

    def suffixed(self, suffix: str) -> Consensus:
        """This consensus over its members each with `suffix` (as `+opening`)."""
        return replace(
            self, members=tuple(m + suffix for m in self.members), name=self.name + suffix
        )

    def draw(
        self,
        drawer: Drawer,
        prepared: Sequence[Prepared],
        sampling: SamplingConfig,
        style: PromptStyle,
    ) -> Drawn:
        """Each member prompt's greedy answer (with a `beam_width` over 1 and a one-line
        answer, its best beam) and then sampled answers (seeds 1..samples); the answer the
        others agree with most, compared by what of each counts (`style.answer`), and
        `info["consensus"]` says which."""
        candidates: list[Drawn] = []
        sampled = [
            replace(sampling, temperature=self.temperature, seed=seed)
            for seed in range(1, self.samples + 1)
        ]
        if self.beam_width > 1 and style.one_line:
            for prompt in prepared:
                best = drawer.beams(prompt, sampling, style, self.beam_width)[0]
                candidates.append((prompt, best.text, None))
                drawn = drawer.answers(prompt, sampled, style)
                candidates.extend((prompt, text, completion) for text, completion in drawn)
        else:
            # One batch per step decodes every member's candidates side by side, the members
            # sharing their prompts' common start (Drawer.answers_each).
            asks = [(prompt, [sampling, *sampled]) for prompt in prepared]
            for prompt, drawn in zip(prepared, drawer.answers_each(asks, style), strict=True):
                candidates.extend((prompt, text, completion) for text, completion in drawn)
        best = choose([style.answer(text) for _, text, _ in candidates])
        prompt, text, completion = candidates[best]
        prompt.personalization.info["consensus"] = {
            "member": prompt.strategy,
            "candidate": best,
            "candidates": len(candidates),
        }
        return replace(prompt, strategy=self.name), text, completion


def tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric runs: the `rouge-score` package's tokens, without stemming."""
    return _TOKEN.findall(text.lower())


def unigram_f1(a: Counter[str], b: Counter[str]) -> float:
    """ROUGE-1 F-measure between two token bags (symmetric)."""
    overlap = sum((a & b).values())
    if overlap == 0:
        return 0.0
    return 2 * overlap / (sum(a.values()) + sum(b.values()))


def choose(candidates: Sequence[str]) -> int:
    """The index of the candidate with the highest summed unigram F1 against the others;
    the earliest wins a tie (candidates come greedy, or best beam, first). An empty answer
    never wins while a non-empty one exists."""
    if not candidates:
        raise ValueError("choose() needs at least one candidate")
    bags = [Counter(tokens(c)) for c in candidates]
    best, best_score = 0, -1.0
    for i, bag in enumerate(bags):
        if not bag and any(bags):
            continue
        score = sum(unigram_f1(bag, other) for j, other in enumerate(bags) if j != i)
        if score > best_score:
            best, best_score = i, score
    return best
