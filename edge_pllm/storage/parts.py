"""Long texts in parts: every part of an item gets a vector, so all of it is searchable.

The embedder reads about the first 256 tokens of a text (`WHOLE_CHARS` characters of English
prose): a text that short has one vector. A longer item keeps that one vector of its whole
text (what the persona aggregates, and what finds the item by its start) and gets one more
for each of its parts: the text cut at paragraph, else sentence, else word boundaries into
spans of at most `PART_CHARS` characters, each after the first starting with the last
sentence of the one before when that is short (`OVERLAP_CHARS`). Parts are spans of the
item's own text, so a search hit shows the passage that matched; the item stays one item
(it dumps, is deleted and is erased as one).

Parts are shorter than what the embedder reads: a fact in a short span is not drowned by
the text around it. Chosen on made-up facts in long notes among 500 other items (the
importing benchmark's long notes, on two other seeds than the one it reports; recall@3
averaged over the start, middle and end of the notes): parts of 400 characters 0.73, 500
0.63, 600 0.67, 800 0.62, 1,000 0.63; a note's one vector alone 0.32.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

WHOLE_CHARS = 1000
PART_CHARS = 400
OVERLAP_CHARS = 80
# A text so long that its parts would pass this many has longer parts (up to WHOLE_CHARS):
# an item has at most about twice this many vectors (a part holds one unit over half its
# size, or several).
MOST_PARTS = 1000

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
_EDGE = re.compile(r"\S")


def _stripped(text: str, start: int, stop: int) -> tuple[int, int] | None:
    """The span `start:stop` without its leading and trailing whitespace (None: all space)."""
    first = _EDGE.search(text, start, stop)
    if first is None:
        return None
    last = stop
    while text[last - 1].isspace():
        last -= 1
    return first.start(), last


def _between(
    text: str, start: int, stop: int, breaks: re.Pattern[str]
) -> Iterator[tuple[int, int]]:
    """The non-blank spans of `text[start:stop]` between matches of `breaks`."""
    at = start
    for match in breaks.finditer(text, start, stop):
        if (span := _stripped(text, at, match.start())) is not None:
            yield span
        at = match.end()
    if (span := _stripped(text, at, stop)) is not None:
        yield span


def _units(text: str, size: int) -> Iterator[tuple[int, int]]:
    """Paragraphs of at most `size` characters; longer ones in sentences, and a sentence
    longer than that cut at its last space that fits (or at `size` when there is none in
    the second half)."""
    for p_start, p_stop in _between(text, 0, len(text), _PARAGRAPH_BREAK):
        if p_stop - p_start <= size:
            yield p_start, p_stop
            continue
        for s_start, s_stop in _between(text, p_start, p_stop, _SENTENCE_BREAK):
            while s_stop - s_start > size:
                cut = text.rfind(" ", s_start, s_start + size)
                cut = cut if cut > s_start + size // 2 else s_start + size
                if (span := _stripped(text, s_start, cut)) is not None:
                    yield span
                rest = _stripped(text, cut, s_stop)
                if rest is None:
                    break
                s_start, s_stop = rest
            else:
                yield s_start, s_stop


def part_spans(
    text: str, size: int = PART_CHARS, overlap: int = OVERLAP_CHARS, whole: int = WHOLE_CHARS
) -> list[tuple[int, int]]:
    """The (start, stop) character spans of `text`'s parts, in order, each at most `size`
    characters (more for a text over `MOST_PARTS` times that, up to `whole`); none when
    the text is at most `whole` characters (its one vector reads all of it)."""
    if len(text) <= max(whole, size):
        return []
    size = max(size, min(whole, -(-len(text) // MOST_PARTS)))
    spans: list[tuple[int, int]] = []
    start: int | None = None
    stop = 0
    last: tuple[int, int] | None = None
    for u_start, u_stop in _units(text, size):
        if start is not None and u_stop - start > size:
            spans.append((start, stop))
            assert last is not None
            keep = last[1] - last[0] <= overlap and u_stop - last[0] <= size
            start = last[0] if keep else u_start
        if start is None:
            start = u_start
        stop, last = u_stop, (u_start, u_stop)
    if start is None:  # nothing visible: no parts
        return []
    spans.append((start, stop))
    return spans


def vector_texts(text: str) -> list[str]:
    """What is embedded for an item's `text`: the whole text (its only vector when it is
    short), then each of its parts. `HistoryStore.add` takes the vectors in this order."""
    return [text, *(text[a:b] for a, b in part_spans(text))]


def texts_to_embed(texts: Iterable[str]) -> list[str]:
    """Each text's `vector_texts`, one after another: what `HistoryStore.add` takes the
    vectors of, for items of these texts."""
    return [t for text in texts for t in vector_texts(text)]


def vector_count(text: str) -> int:
    """How many vectors an item of `text` has (`len(vector_texts(text))`)."""
    return 1 + len(part_spans(text))
