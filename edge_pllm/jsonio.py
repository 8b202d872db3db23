"""Parsing JSON that crosses a boundary (an HTTP body, an input file, a manifest).

Python's `json` raises more than `JSONDecodeError` on hostile input: a `ValueError` for an
integer of over 4,300 digits, a `RecursionError` for deep nesting, and it accepts `NaN`
and `Infinity`. Every such case becomes one `InvalidInputError` here, so no caller has to
know them.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

from .errors import InvalidInputError

MAX_DEPTH = 32
MAX_INT_DIGITS = 64


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _bounded_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"a number too large for a float ({text[:20]})")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name}, which is not a JSON number")


def _depth(value: Any) -> int:
    """Nesting depth, without recursion (the parser has already refused absurd depths)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return deepest


# Possessive: a string that never closes is read once, never backtracked (linear time).
_STRING = re.compile(r'"(?:[^"\\]|\\.?)*+(?:"|\Z)', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _too_deep(text: str) -> bool:
    """Whether brackets outside strings nest deeper than MAX_DEPTH, found without parsing:
    `json` recurses once per level, and a body nested a thousand deep would bring the
    stack to Python's limit, where any finalizer that runs then (a garbage-collected
    llama.cpp sampler) fails unseen."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if len(brackets) <= MAX_DEPTH:
        return False
    return max(accumulate(1 if c in "[{" else -1 for c in brackets)) > MAX_DEPTH


def parse_json(raw: str | bytes, what: str, *, field: str | None = None) -> Any:
    """The value in `raw`, or an InvalidInputError that names `what` and the fault.

    Refused: invalid UTF-8, invalid JSON, integers of over 64 digits, numbers too large for
    a float, NaN and Infinity, and nesting deeper than 32 levels.
    """
    if isinstance(raw, bytes | bytearray):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(
                f"{what} is not valid UTF-8 (bad byte at offset {exc.start}).", field=field
            ) from None
    if _too_deep(raw):
        raise InvalidInputError(
            f"{what} is nested too deeply (at most {MAX_DEPTH} levels).", field=field
        )
    try:
        value = json.loads(
            raw,
            parse_int=_bounded_int,
            parse_float=_bounded_float,
            parse_constant=_refuse_constant,
        )
    except RecursionError:
        raise InvalidInputError(
            f"{what} is nested too deeply (at most {MAX_DEPTH} levels).", field=field
        ) from None
    except json.JSONDecodeError as exc:
        raise InvalidInputError(
            f"{what} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).",
            field=field,
        ) from None
    except ValueError as exc:  # from the bounded number parsers
        raise InvalidInputError(f"{what} holds {exc}.", field=field) from None
    if _depth(value) > MAX_DEPTH:
        raise InvalidInputError(
            f"{what} is nested too deeply (at most {MAX_DEPTH} levels).", field=field
        )
    return value
