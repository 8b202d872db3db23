"""Prepared prompts into text through the LLM: `Drawer` is the one place that does it (the
user's opening put on, a one-line answer cut at its line), for every decoder."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from contextlib import closing
from dataclasses import dataclass, replace

import numpy as np

from ..inference.bundle import Placement
from ..inference.llm import LLM, Ask, Completion, SamplingConfig
from ..personalization.prompts import PromptStyle, first_line
from ..personalization.strategies import Personalization, opened
from .answers import AnswerReader
from .beam import Beam, beam_answers


@dataclass
class Prepared:
    """A prompt ready to generate from (templated text plus optional soft tokens)."""

    prompt: str
    personalization: Personalization
    strategy: str
    dropped_context: int
    placement: Placement = "prefix"  # where the soft tokens go (the head says)
    request: str = ""  # the user's own last turn
    request_vector: np.ndarray | None = None  # its embedding, if a strategy computed it


Drawn = tuple[Prepared, str, Completion | None]  # the prompt answered, the text, its cost


class Drawer:
    """Answers from prepared prompts through one LLM (its caller holds the LLM's lock)."""

    def __init__(self, llm: LLM):
        self.llm = llm

    def stream(
        self,
        prepared: Prepared,
        sampling: SamplingConfig,
        style: PromptStyle,
        on_end: Callable[[Completion], None] | None = None,
    ) -> Generator[str, None, None]:
        """The answer's text as it is generated (with a one-line style, up to its first line
        with an answer: the generation ends there), opening with the user's opening if the
        strategy gave one (`opened`); `on_end` as `LLM.stream`'s."""
        start = prepared.personalization.answer_start
        soft = prepared.personalization.soft_tokens
        drawn = self.llm.stream(prepared.prompt, soft, sampling, prepared.placement, on_end)
        with closing(drawn) as s:
            pieces = first_line(s, style.answer) if style.one_line else s
            if not start:
                yield from pieces
                return
            yield start
            head = ""
            for piece in pieces:  # up to the first word's end: then the model's opening is known
                head += piece
                if any(c.isspace() for c in head.lstrip()):
                    break
            yield opened(start, head)[len(start) :]
            yield from pieces

    def answer(
        self, prepared: Prepared, sampling: SamplingConfig, style: PromptStyle
    ) -> tuple[str, Completion | None]:
        """The whole answer and its `Completion` (none for a one-line answer: it was cut
        short on purpose)."""
        ended: list[Completion] = []
        with closing(self.stream(prepared, sampling, style, ended.append)) as pieces:
            text = "".join(pieces)
        return text, replace(ended[0], text=text) if ended and not style.one_line else None

    def answers(
        self, prepared: Prepared, samplings: Sequence[SamplingConfig], style: PromptStyle
    ) -> list[tuple[str, Completion | None]]:
        """`answer` for each of `samplings`, decoded side by side in one batch per step
        (`LLM.draw`: the same answers where llama.cpp attends a lone token in one piece),
        the prompt computed once."""
        return self.answers_each([(prepared, samplings)], style)[0]

    def answers_each(
        self,
        asks: Sequence[tuple[Prepared, Sequence[SamplingConfig]]],
        style: PromptStyle,
    ) -> list[list[tuple[str, Completion | None]]]:
        """`answers` for each prepared prompt, all of them side by side where they fit
        (`LLM.draw_each`: a prompt shares the first one's keys and values up to where they
        part)."""
        drawn = self.llm.draw_each(
            [
                Ask(p.prompt, p.personalization.soft_tokens, tuple(samplings), p.placement)
                for p, samplings in asks
            ],
            # The stop strings are each answer's own (LLM.draw); the one-line end is the style's.
            AnswerReader.of(self.llm, style.answer, style.one_line).ended,
        )
        out: list[list[tuple[str, Completion | None]]] = []
        for (prepared, samplings), completions in zip(asks, drawn, strict=True):
            start = prepared.personalization.answer_start
            mine = []
            for s, done in zip(samplings, completions, strict=True):
                text = AnswerReader.of(self.llm, style.answer, style.one_line, s.stop).text(
                    done.ids
                )
                text = opened(start, text) if start else text
                mine.append((text, None if style.one_line else replace(done, text=text)))
            out.append(mine)
        return out

    def beams(
        self, prepared: Prepared, sampling: SamplingConfig, style: PromptStyle, width: int
    ) -> list[Beam]:
        """The answers of a beam search `width` wide from `prepared`, best first (each with
        the user's opening if the strategy gave one)."""
        start = prepared.personalization.answer_start
        beams = beam_answers(
            self.llm,
            prepared.prompt,
            prepared.personalization.soft_tokens,
            sampling,
            prepared.placement,
            AnswerReader.of(self.llm, style.answer, style.one_line, sampling.stop),
            width,
        )
        return [replace(b, text=opened(start, b.text)) for b in beams] if start else beams
