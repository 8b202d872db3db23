"""Text on its way to a terminal: stored history, answers and names can hold escape
sequences and other control characters that would drive the reader's terminal (move the
cursor, retitle the window, hide text, reorder it). Everything printed from the store or
the model passes through `shown` (plain text) or `shown_json` (JSON lines), which write such
characters as visible escapes and keep the rest as it is."""

from __future__ import annotations

import unicodedata

from .storage.items import invisible


def _escape(char: str) -> str:
    code = ord(char)
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
    )


def _unsafe(char: str, keep: str) -> bool:
    if char in keep:
        return False
    return unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") or invisible(char)


def shown(text: str, keep: str = "\n\t") -> str:
    """`text` with control, format and invisible characters written as `\\x1b`, `\\u202e`,
    …, except those in `keep` (newlines and tabs by default; "" for one-line output)."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(_escape(c) if _unsafe(c, keep) else c for c in text)


def shown_json(line: str) -> str:
    """A JSON text (as `json.dumps(..., ensure_ascii=False)` writes it: C0 controls already
    escaped) with the remaining unsafe characters as JSON `\\uXXXX` escapes: the same JSON
    value, safe on a terminal."""
    if line.isascii() and "\x7f" not in line:
        return line
    out = []
    for c in line:
        if _unsafe(c, ""):
            data = c.encode("utf-16-be", "surrogatepass")
            out.extend(f"\\u{int.from_bytes(data[i : i + 2]):04x}" for i in range(0, len(data), 2))
        else:
            out.append(c)
    return "".join(out)
