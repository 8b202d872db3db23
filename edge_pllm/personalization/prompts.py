"""Prompt construction, in one place for every strategy: strategies only choose what
personalization goes in (history items, soft tokens); this module decides how it is shown.

History shown in the prompt is cut to fit the context: whole items are dropped from the
end of the strategy's list (the least relevant or oldest), never the user's own request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..errors import ContextOverflowError
from ..storage.items import HistoryItem

MAX_ITEM_CHARS_IN_PROMPT = 1_000
HISTORY_HEADER = (
    "Below are earlier texts written by the user you are helping. Use them only to match "
    "the user's style and conventions; do not repeat them."
)


def render_item(item: HistoryItem) -> str:
    text = item.text.strip()
    if len(text) > MAX_ITEM_CHARS_IN_PROMPT:
        text = text[:MAX_ITEM_CHARS_IN_PROMPT].rstrip() + " …"
    return text


@dataclass(frozen=True)
class PromptStyle:
    """How history is introduced and how each item is shown (tasks bring their own)."""

    header: str = HISTORY_HEADER
    render_item: Callable[[HistoryItem], str] = render_item
    # What of a raw answer counts (a task's scorer reads one cleaned line): what `consensus`
    # compares its candidates by; with `one_line`, the answer is that line and generation
    # stops at its end (`first_line`).
    answer: Callable[[str], str] = str.strip
    one_line: bool = False


DEFAULT_STYLE = PromptStyle()


def first_line(pieces: Iterator[str], clean: Callable[[str], str] = str.strip) -> Iterator[str]:
    """The stream up to the end of its first line with an answer, as `clean` (the task's
    scorer's reading of an answer) leaves it: a one-line answer stops there, and so does
    the generation. A line that only announces the answer ("The subject line is:") or that
    `clean` empties (markup) is passed over."""
    line = ""
    for piece in pieces:
        line += piece
        while "\n" in line:
            head, _, line = line.partition("\n")
            answer = clean(head)
            if answer and not answer.endswith(":"):
                yield answer
                return
    if clean(line):
        yield clean(line)


def history_block(context: Sequence[HistoryItem], style: PromptStyle = DEFAULT_STYLE) -> str:
    shown = "\n\n".join(f"<text>\n{style.render_item(item)}\n</text>" for item in context)
    return f"{style.header}\n\n{shown}"


Messages = list[dict[str, str]]


def with_history(
    messages: Sequence[dict[str, str]],
    context: Sequence[HistoryItem],
    system: str | None = None,
    style: PromptStyle = DEFAULT_STYLE,
) -> Messages:
    """History goes in the system turn (after any system text); the turns stay as they are."""
    turns = [dict(m) for m in messages]
    own_system = [m["content"] for m in turns if m.get("role") == "system"]
    turns = [m for m in turns if m.get("role") != "system"]
    parts = [system, *own_system, history_block(context, style) if context else None]
    text = "\n\n".join(p for p in parts if p)
    return ([{"role": "system", "content": text}] if text else []) + turns


def build_messages(
    query: str,
    context: Sequence[HistoryItem],
    system: str | None = None,
    style: PromptStyle = DEFAULT_STYLE,
) -> Messages:
    """A single request: history in the system turn, the request alone in the user turn."""
    return with_history([{"role": "user", "content": query}], context, system, style)


def fit_prompt(
    messages: Sequence[dict[str, str]],
    context: Sequence[HistoryItem],
    *,
    render: Callable[[list[dict[str, str]]], str],
    count_tokens: Callable[[str], int],
    budget: int,
    most_tokens: Callable[[str], int] | None = None,
    n_ctx: int,
    max_tokens: int,
    soft_tokens: int = 0,
    system: str | None = None,
    style: PromptStyle = DEFAULT_STYLE,
) -> tuple[str, list[HistoryItem]]:
    """The templated prompt with as much of `context` as fits in `budget` tokens.

    Returns the prompt and the items kept. Raises ContextOverflowError when even the
    bare request does not fit. `most_tokens` (a bound on `count_tokens` that does not
    tokenize) spares the counting of a prompt that fits by it.
    """
    kept = list(context)
    while True:
        prompt = render(with_history(messages, kept, system, style))
        if most_tokens is not None and most_tokens(prompt) <= budget:
            return prompt, kept
        n = count_tokens(prompt)
        if n <= budget:
            return prompt, kept
        if not kept:
            raise ContextOverflowError(
                prompt_tokens=n + soft_tokens,
                max_tokens=max_tokens,
                n_ctx=n_ctx,
                soft_tokens=soft_tokens,
            )
        kept.pop()
