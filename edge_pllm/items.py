"""History items: what goes in (`NewItem`), what comes out (`HistoryItem`), and validation.

Validation happens before anything is embedded or written, so rejected input costs nothing
and changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import InvalidInputError

MAX_ITEM_CHARS = 100_000
MAX_USER_CHARS = 200
_KIND = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


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

    A date or time without a zone is taken as UTC.
    """
    parsed = datetime.fromisoformat(value.strip())
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).isoformat(timespec="seconds")


def content_hash(kind: str, text: str) -> str:
    return hashlib.sha256(f"{kind}\x1f{text}".encode()).hexdigest()


def _as_text(value: Any, what: str, index: int | None) -> str:
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


def validate_user(user: Any) -> str:
    name = _as_text(user, "user name", None).strip()
    if not name:
        raise InvalidInputError("The user name is empty; give a non-blank name.", field="user")
    if len(name) > MAX_USER_CHARS or "\x00" in name:
        raise InvalidInputError(
            f"The user name must be at most {MAX_USER_CHARS} characters with no NUL bytes.",
            field="user",
        )
    return name


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
        item = NewItem(
            text=item["text"],
            kind=item.get("kind") or "text",
            created_at=item.get("created_at"),
            metadata=item.get("metadata") or {},
        )
    elif not isinstance(item, NewItem):
        item = NewItem(text=item)  # type: ignore[arg-type]

    text = _as_text(item.text, "text", index)
    if not text.strip():
        raise InvalidInputError(
            "The text is empty or only whitespace; give some content.", field="text", index=index
        )
    if len(text) > MAX_ITEM_CHARS:
        raise InvalidInputError(
            f"The text has {len(text):,} characters, over the limit of {MAX_ITEM_CHARS:,}; "
            "split it into smaller items.",
            field="text",
            index=index,
        )
    if "\x00" in text:
        raise InvalidInputError(
            "The text contains a NUL byte; remove it.", field="text", index=index
        )
    kind = _as_text(item.kind, "kind", index)
    if not _KIND.match(kind):
        raise InvalidInputError(
            f"The kind {kind!r} is not a short label (letters, digits, _ . : -, up to 64).",
            field="kind",
            index=index,
        )
    created = item.created_at
    if created is not None:
        created = _as_text(created, "created_at", index)
        try:
            created = normalize_time(created)
        except ValueError:
            raise InvalidInputError(
                f"created_at {created!r} is not an ISO 8601 date or time (e.g. 2024-05-01).",
                field="created_at",
                index=index,
            ) from None
    if not isinstance(item.metadata, dict):
        raise InvalidInputError("metadata must be a JSON object.", field="metadata", index=index)
    try:
        json.dumps(item.metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"metadata is not JSON-serializable ({exc}).", field="metadata", index=index
        ) from None
    return NewItem(text=text, kind=kind, created_at=created, metadata=dict(item.metadata))


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


def read_jsonl(lines: Iterable[str | bytes]) -> Iterator[dict[str, Any]]:
    """Parse JSONL: one object per non-blank line; a bare JSON string is taken as its text."""
    for number, raw in enumerate(lines, 1):
        line = _as_text(raw, f"line {number}", None).strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(
                f"Line {number} is not valid JSON ({exc.msg}); each line must be one JSON object.",
                field="jsonl",
            ) from None
        if isinstance(value, str):
            value = {"text": value}
        if not isinstance(value, dict):
            raise InvalidInputError(
                f"Line {number} is a JSON {type(value).__name__}, not an object with 'text'.",
                field="jsonl",
            )
        yield value
