"""Beam search: the answers the model finds likeliest, not only the greedy one.

Greedy decoding commits to the likeliest next token; a small model's likeliest whole answer
often starts with a less likely token. Beam search keeps the `width` likeliest partial
answers at each step and returns the finished ones, best first by mean log-probability per
token (long answers are not punished for their length). The log-probabilities are those
greedy decoding picks by: the sampler's repeat penalty applied to what was generated.

Each beam's next-token logits come from `LLM.next_token_logits`, whose prefix cache keeps
the prompt and the beams' shared tokens: a step evaluates only the tokens where a beam
differs from the one evaluated before it. A width of 1 is greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError
from ..inference.bundle import Placement
from ..inference.llm import LLM, SamplingConfig
from .answers import AnswerReader

PENALTY_WINDOW = 64  # llama-cpp-python's default last_n_tokens_size: the tokens penalized
MAX_WIDTH = 16


@dataclass(frozen=True)
class Beam:
    """An answer of the search: its token ids (what ended it included, if anything did
    before `max_tokens`), the answer they read as, and the sum of their log-probabilities."""

    ids: tuple[int, ...]
    text: str
    logprob: float

    @property
    def score(self) -> float:
        """Mean log-probability per token: what beams are ranked by."""
        return self.logprob / max(len(self.ids), 1)


def penalized_logprobs(
    logits: np.ndarray, generated: Sequence[int], penalty: float, window: int = PENALTY_WINDOW
) -> np.ndarray:
    """Log-softmax of `logits` after llama.cpp's repeat penalty on the last `window`
    generated tokens (a positive logit divided by `penalty`, a negative one multiplied)."""
    x = logits.astype(np.float64)
    if penalty != 1.0 and generated and window > 0:
        seen = np.fromiter(set(generated[-window:]), dtype=np.int64)
        x[seen] = np.where(x[seen] > 0, x[seen] / penalty, x[seen] * penalty)
    x -= x.max()
    return x - np.log(np.exp(x).sum())


def search(
    next_logprobs: Callable[[list[int]], np.ndarray],
    reader: AnswerReader,
    width: int,
    max_tokens: int,
) -> list[Beam]:
    """The beams of a search from `next_logprobs(generated ids)`, best first. A beam ends
    where `reader` says the device stops; the search ends when `width` beams have ended
    (the unfinished ones are dropped) or after `max_tokens` steps (then they count as they
    are, as a greedy answer cut at `max_tokens` does)."""
    if not 1 <= width <= MAX_WIDTH:
        raise InvalidInputError(
            f"A beam width must be 1..{MAX_WIDTH} (got {width}).", field="beam_width"
        )
    live: list[tuple[list[int], float]] = [([], 0.0)]
    done: list[tuple[list[int], float]] = []
    for _ in range(max_tokens):
        if len(done) >= width or not live:
            break
        grown = []
        for ids, logprob in live:
            lp = next_logprobs(ids)
            top = min(width, lp.size)
            for token in np.argpartition(-lp, top - 1)[:top]:
                grown.append(([*ids, int(token)], logprob + float(lp[token])))
        grown.sort(key=lambda beam: -beam[1])
        live = []
        for ids, logprob in grown:
            (done if reader.ended(ids) else live).append((ids, logprob))
            if len(live) == width:
                break
    if len(done) >= width:
        live = []
    beams = [Beam(tuple(ids), reader.text(ids), lp) for ids, lp in [*done, *live]]
    # An empty answer ranks last: it is no answer, however likely.
    return sorted(beams, key=lambda b: (not reader.clean(b.text), -b.score))


def beam_answers(
    llm: LLM,
    prompt: str,
    soft: np.ndarray | None,
    sampling: SamplingConfig,
    placement: Placement,
    reader: AnswerReader,
    width: int,
) -> list[Beam]:
    """Beam search over the completion of `prompt` (templated) with `soft` tokens where
    `placement` says; `sampling` gives the repeat penalty and the most tokens."""
    before, after = llm.prompt_parts(prompt, soft, placement, sampling.max_tokens)
    ids, at = [*before, *after], None if soft is None else len(before)
    window = llm.llama.last_n_tokens_size

    def next_logprobs(generated: list[int]) -> np.ndarray:
        logits = llm.next_token_logits([*ids, *generated], soft, at)
        return penalized_logprobs(logits, generated, sampling.repeat_penalty, window)

    return search(next_logprobs, reader, width, sampling.max_tokens)
