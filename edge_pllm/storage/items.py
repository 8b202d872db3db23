"""History items: what goes in (`NewItem`), what comes out (`HistoryItem`), and validation.

Validation happens before anything is embedded or written, so rejected input costs nothing
and changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..errors import InvalidInputError
from ..jsonio import parse_json

MAX_ITEM_CHARS = 1_000_000  # a longer text is split into parts for search (`parts`)
TURN_KIND = "turn"  # a request the user wrote, remembered (memory on)
MAX_USER_CHARS = 200
MAX_METADATA_CHARS = 100_000  # an item's metadata, as JSON text
MAX_METADATA_DEPTH = 32  # nesting levels, the metadata object itself included (jsonio's limit)
_KIND = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # always with fullmatch
# Code points that show as nothing though Unicode does not class them as control or format
# characters: Default_Ignorable_Code_Point (DerivedCoreProperties.txt; the Hangul fillers,
# the combining grapheme joiner, variation selectors, tags), and the blank braille pattern.
_INVISIBLE = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x2800, 0x2800),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)
# Control, format, surrogate, private-use and unassigned code points; line and paragraph
# separators. (Spaces other than U+0020 are refused in names separately.)
_UNSEEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def invisible(char: str) -> bool:
    """Whether `char` shows as nothing (or as a stand-in box): control, format, surrogate,
    private-use or unassigned code points, line and paragraph separators, and the default-
    ignorable code points Unicode classes as letters or symbols (U+3164 HANGUL FILLER)."""
    if unicodedata.category(char) in _UNSEEN_CATEGORIES:
        return True
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _INVISIBLE)


def visible_text(text: str) -> bool:
    """Whether `text` holds at least one character a reader can see."""
    return any(not c.isspace() and not invisible(c) for c in text)


@dataclass(frozen=True)
class NewItem:
    """A history item to add: its text, a kind label, when it was written, free metadata."""

    text: str
    kind: str = "text"
    created_at: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HistoryItem:
    """A stored history item."""

    id: int
    user: str
    kind: str
    text: str
    created_at: str
    written_at: str
    metadata: dict[str, Any]
    content_hash: str

    def to_json(self) -> dict[str, Any]:
        """The portable form used by export/import (no ids, no vectors: both are derived)."""
        return {
            "text": self.text,
            "kind": self.kind,
            "created_at": self.created_at,
            "metadata": self.metadata,
        }


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def normalize_time(value: str) -> str:
    """ISO 8601 in UTC (`2024-01-02T03:04:05+00:00`), so that text order is time order.

    A date or time without a zone is taken as UTC. ValueError for text that is not such a
    date, or one that lies outside the years 1 to 9999 once moved to UTC.
    """
    parsed = datetime.fromisoformat(value.strip())
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC).isoformat(timespec="seconds")
    except OverflowError:  # 9999-12-31T23:59:59-14:00 is in year 10000 in UTC
        raise ValueError(f"{value!r} lies outside the years 1 to 9999 in UTC") from None


def content_hash(kind: str, text: str) -> str:
    return hashlib.sha256(f"{kind}\x1f{text}".encode()).hexdigest()


def as_text(value: Any, what: str, index: int | None) -> str:
    """`value` as text that can be stored as UTF-8 (bytes are decoded), or an
    InvalidInputError naming `what`."""
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(
                f"The {what} is not valid UTF-8 (bad byte at offset {exc.start}); "
                "re-encode it as UTF-8.",
                field=what,
                index=index,
            ) from None
    if not isinstance(value, str):
        raise InvalidInputError(
            f"The {what} must be text, not {type(value).__name__}.", field=what, index=index
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(
            f"The {what} contains unpaired surrogates and cannot be stored as UTF-8; "
            "decode the source with errors='strict' or 'replace'.",
            field=what,
            index=index,
        ) from None
    return value


def validate_user(user: Any, *, existing: bool = False) -> str:
    """`user` itself, if it can name a user; else an InvalidInputError saying why.

    A name is compared exactly, never folded, and holds only characters a reader can see,
    so that two names that look alike are the same name: spaces at either end, spaces
    other than U+0020, anything `invisible` (control, format, default-ignorable, private-
    use, unassigned), a combining mark with nothing to combine with, and `/` (a name must
    fit one URL path segment, so the CLI and the server reach the same users) are refused,
    not stripped. The server, the CLI and the library share this rule. With `existing`,
    a name to look up: only its type and length are checked, so that a user stored under
    an earlier, looser rule can still be listed, exported and forgotten.
    """
    name = as_text(user, "user name", None)
    if not name.strip():
        raise InvalidInputError("The user name is empty; give a non-blank name.", field="user")
    if len(name) > MAX_USER_CHARS:
        raise InvalidInputError(
            f"The user name has {len(name)} characters; the limit is {MAX_USER_CHARS}.",
            field="user",
        )
    if existing:
        return name
    if name != name.strip():
        raise InvalidInputError(
            f"The user name {name!r} begins or ends with a space; names are compared exactly, "
            "so remove it.",
            field="user",
        )
    bad = next((c for c in name if c == "/" or _unseen_in_name(c)), None)
    if bad is not None:
        what = unicodedata.name(bad, "an unnamed code point")
        raise InvalidInputError(
            f"The user name {name!a} contains U+{ord(bad):04X} ({what}); a name holds "
            "only characters a reader can see, and no '/'.",
            field="user",
        )
    if unicodedata.category(name[0]).startswith("M"):
        raise InvalidInputError(
            f"The user name {name!a} begins with a combining mark (U+{ord(name[0]):04X}); "
            "begin it with a letter, digit or symbol.",
            field="user",
        )
    return name


def _unseen_in_name(char: str) -> bool:
    return invisible(char) or (unicodedata.category(char) == "Zs" and char != " ")


def validate_answer_id(value: Any) -> str:
    """`value` if it can name an answer (a short label: letters, digits, _ . : -, up to 64,
    as the server's `chatcmpl-…` ids are); else an InvalidInputError."""
    answer_id = as_text(value, "answer_id", None)
    if not _KIND.fullmatch(answer_id):
        raise InvalidInputError(
            f"The answer id {answer_id[:80]!r} is not an answer id (letters, digits, _ . : -, "
            "up to 64).",
            field="answer_id",
        )
    return answer_id


def validate_item(
    item: NewItem | str | bytes | dict[str, Any], index: int | None = None
) -> NewItem:
    """Turn `item` into a checked NewItem, or raise InvalidInputError saying what is wrong."""
    if isinstance(item, dict):
        unknown = set(item) - {"text", "kind", "created_at", "metadata"}
        if unknown:
            raise InvalidInputError(
                f"Unknown field(s) {sorted(unknown)}; an item has text, kind, created_at and "
                "metadata.",
                index=index,
            )
        if "text" not in item:
            raise InvalidInputError("The item has no 'text' field.", field="text", index=index)
        # A missing or null field takes its default; any other value is checked as given
        # (a kind of 0 or a metadata of [] is refused, not silently replaced).
        kind, metadata = item.get("kind"), item.get("metadata")
        item = NewItem(
            text=item["text"],
            kind="text" if kind is None else kind,
            created_at=item.get("created_at"),
            metadata={} if metadata is None else metadata,
        )
    elif not isinstance(item, NewItem):
        item = NewItem(text=item)  # type: ignore[arg-type]

    text = as_text(item.text, "text", index)
    if not visible_text(text):
        raise InvalidInputError(
            "The text is empty or holds nothing visible (only spaces, control or format "
            "characters); give some content.",
            field="text",
            index=index,
        )
    if len(text) > MAX_ITEM_CHARS:
        raise InvalidInputError(
            f"The text has {len(text):,} characters, over the limit of {MAX_ITEM_CHARS:,}; "
            "split it into smaller items (`edge-pllm import` cuts a longer file into sections).",
            field="text",
            index=index,
        )
    if "\x00" in text:
        raise InvalidInputError(
            "The text contains a NUL byte; remove it.", field="text", index=index
        )
    kind = as_text(item.kind, "kind", index)
    if not _KIND.fullmatch(kind):
        raise InvalidInputError(
            f"The kind {kind[:80]!r} is not a short label (letters, digits, _ . : -, up to 64).",
            field="kind",
            index=index,
        )
    created = item.created_at
    if created is not None:
        created = as_text(created, "created_at", index)
        try:
            created = normalize_time(created)
        except ValueError:
            raise InvalidInputError(
                f"created_at {created[:64]!r} is not an ISO 8601 date or time in the years "
                "1 to 9999 (e.g. 2024-05-01).",
                field="created_at",
                index=index,
            ) from None
    metadata = _checked_metadata(item.metadata, index)
    return NewItem(text=text, kind=kind, created_at=created, metadata=metadata)


def _shape_fault(value: Any) -> str | None:
    """What makes `value` too deep or too big to be metadata, or None: a walk without
    recursion that stops at the first fault, so neither a deep, a self-containing nor a
    vastly shared value (a list holding one list many times over) can exhaust the stack or
    the time. Each value takes at least one character of JSON, so more values than
    MAX_METADATA_CHARS are over that limit before a character is written."""
    stack, seen = [(value, 1)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if isinstance(node, dict | list | tuple):
            if depth > MAX_METADATA_DEPTH:
                return f"is nested too deeply (at most {MAX_METADATA_DEPTH} levels)"
            if seen + len(stack) + len(node) > MAX_METADATA_CHARS:  # before any is pushed
                return f"holds over {MAX_METADATA_CHARS:,} values"
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return None


def _checked_metadata(metadata: Any, index: int | None) -> dict[str, Any]:
    """`metadata` if it is a JSON object that can be stored: at most MAX_METADATA_DEPTH
    levels deep, MAX_METADATA_CHARS long as JSON, with no NaN, infinity or unserializable
    value; else an InvalidInputError."""
    if not isinstance(metadata, dict):
        raise InvalidInputError(
            f"metadata must be a JSON object, not {type(metadata).__name__}.",
            field="metadata",
            index=index,
        )
    fault = _shape_fault(metadata)
    if fault is not None:
        raise InvalidInputError(f"metadata {fault}.", field="metadata", index=index)
    try:
        size = len(json.dumps(metadata, allow_nan=False, ensure_ascii=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidInputError(
            f"metadata is not JSON-serializable ({exc}).", field="metadata", index=index
        ) from None
    if size > MAX_METADATA_CHARS:
        raise InvalidInputError(
            f"metadata is {size:,} characters as JSON, over the limit of "
            f"{MAX_METADATA_CHARS:,}; store less in it.",
            field="metadata",
            index=index,
        )
    return dict(metadata)


def validate_items(items: Iterable[NewItem | str | bytes | dict[str, Any]]) -> list[NewItem]:
    if isinstance(items, str | bytes | dict | NewItem):
        items = [items]  # one item, not its characters or keys
    elif not isinstance(items, Iterable):
        raise InvalidInputError(
            f"Items must be a list of texts or objects, not {type(items).__name__}.",
            field="items",
        )
    checked = [validate_item(item, i) for i, item in enumerate(items)]
    if not checked:
        raise InvalidInputError("No items given; pass at least one.", field="items")
    return checked


def read_jsonl(lines: Iterable[str | bytes], source: str | None = None) -> Iterator[dict[str, Any]]:
    """Parse JSONL: one object per non-blank line; a bare JSON string is taken as its text.

    Each line is parsed as any JSON that crosses a boundary (`jsonio.parse_json`: bounded
    numbers and nesting); `source` (a file name) is named in the errors."""
    where = f" of {source}" if source else ""
    for number, raw in enumerate(lines, 1):
        line = as_text(raw, f"line {number}{where}", None).strip()
        if not line:
            continue
        value = parse_json(line, f"Line {number}{where}", field="jsonl")
        if isinstance(value, str):
            value = {"text": value}
        if not isinstance(value, dict):
            raise InvalidInputError(
                f"Line {number}{where} is a JSON {json_type(value)}, not an object with 'text'.",
                field="jsonl",
            )
        yield value


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (array, number, ...), for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {list: "array", dict: "object", str: "string"}.get(type(value), type(value).__name__)


def source_label(metadata: dict[str, Any]) -> str:
    """Where an item came from, for a person to read: "notes/a.md, message 3", a git
    commit's repository and short hash, or "" for an item typed by hand."""
    source = metadata.get("source")
    if not isinstance(source, dict):
        return ""
    if "git" in source:
        return f"{source['git']} {str(source.get('commit', ''))[:10]}".strip()
    where = [str(source[key]) for key in ("path", "in", "section") if source.get(key)]
    return ", ".join(where)
