"""Where a generated answer ends and what of it counts, read from its token ids.

`prompts.first_line` reads a stream of text; decoders that keep several answers at once
(beam search here, the outcome term of training) hold token ids instead. `AnswerReader`
reads those the same way: an answer ends at an end-of-generation token or, for a
one-line task, at the end of the first line that holds an answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..inference.llm import LLM, cut_at_stop
from ..personalization.prompts import first_line


@dataclass(frozen=True)
class AnswerReader:
    """An answer's token ids as the device reads them: where generation ends (`ended`) and
    the answer it returns (`text`)."""

    eog: frozenset[int]  # end-of-generation tokens
    breaks: frozenset[int]  # tokens whose text holds a line break
    detokenize: Callable[[list[int]], str]
    clean: Callable[[str], str]  # the task's reading of an answer (PromptStyle.answer)
    one_line: bool  # the answer is its first line (PromptStyle.one_line)
    stop: tuple[str, ...] = ()  # the request's stop strings (SamplingConfig.stop)

    @classmethod
    def of(
        cls,
        llm: LLM,
        clean: Callable[[str], str],
        one_line: bool,
        stop: Sequence[str] = (),
    ) -> AnswerReader:
        return cls(llm.eog_ids, llm.line_break_ids, llm.detokenize, clean, one_line, tuple(stop))

    def ended(self, ids: Sequence[int]) -> bool:
        """Whether the device would have stopped after `ids`."""
        if not ids:
            return False
        if ids[-1] in self.eog:
            return True
        if self.stop and any(s in self.detokenize(list(ids)) for s in self.stop):
            return True
        if not self.one_line or ids[-1] not in self.breaks:
            return False
        *lines, _ = self.detokenize(list(ids)).split("\n")
        return any((a := self.clean(line)) and not a.endswith(":") for line in lines)

    def text(self, ids: Sequence[int]) -> str:
        """The answer the device returns for `ids`: the text before any stop string; with
        `one_line`, its first answer line as `clean` reads it (as `PersonalLLM.generate`
        returns each)."""
        body = cut_at_stop(self.detokenize([t for t in ids if t not in self.eog]), self.stop)
        if not self.one_line:
            return body
        return next(first_line(iter([body]), self.clean), "")
