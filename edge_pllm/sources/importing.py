"""What a person keeps, read into history items: notes, documents, mail and chat exports.

`import_paths` walks files and folders (recursively; hidden folders such as `.git` are not
entered) and reads each file it knows by its type:

- plain text and Markdown (`.txt`, `.md`, `.markdown`, `.rst`, `.org`): the text;
- HTML (`.html`, `.htm`): its visible text (no scripts, styles or markup);
- mail (`.mbox`, `.eml`): the person's own messages only (the sender is one of `me`), each
  its subject and body, without headers, quoted replies or the signature;
- ChatGPT's data export (`conversations.json`): the person's own turns in every branch of
  every conversation, never the assistant's;
- chat messages as JSON lines (`.jsonl`, `{"role", "content"}` a line): the user's turns;
- PDF (`.pdf`): its text layer, page by page (needs the `[pdf]` extra: pypdf).

Each message, turn, note or document is one item, however long: the store gives a long
one a vector for each of its parts (`parts`), so all of it is searchable, and it dumps
and goes as one. A text over the item limit (`MAX_ITEM_CHARS`) is cut, at part
boundaries, into sections that are items of their own. Every item records where it came
from (`metadata.source`: path, and where in the file, section). Importing again is
incremental (the store's `sources`): an unchanged file (same size and modification time,
or same sha256) is skipped, a changed one has its items replaced, and a file gone from a
folder that was imported has its items removed, each file in one transaction. A file
that cannot be read is reported and skipped; the others are imported.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import mailbox
import os
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from email.utils import getaddresses, parsedate_to_datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidInputError
from ..jsonio import parse_json
from ..storage.items import MAX_ITEM_CHARS, NewItem
from ..storage.parts import part_spans, texts_to_embed
from ..storage.store import HistoryStore, SourceFile

NOTE_KIND, MAIL_KIND, CHAT_KIND = "note", "mail", "chat"
# Told of a file and how many texts it gives, before they are embedded; may return what is
# told how many are done as they are.
Embedding = Callable[[Path, int], Callable[[int], None] | None]
# Texts into vectors, told of each text done (`Embedder.embed`, loaded only when called).
Embed = Callable[[list[str], Callable[[int], None] | None], np.ndarray]
MAX_FILE_BYTES = 50 * 2**20  # a larger file is reported, not read


class ReadError(Exception):
    """A file that cannot be read as its type says (the reason is the message)."""


@dataclass(frozen=True)
class Piece:
    """One thing a file holds, before it is split into parts: its text, kind and date."""

    text: str
    kind: str = NOTE_KIND
    created_at: str | None = None
    where: str = ""  # within the file: a message, a conversation's turn


@dataclass
class ImportReport:
    """What an import did: files read, skipped unchanged, removed; items added and removed;
    files skipped with the reason."""

    files: int = 0
    imported: int = 0
    unchanged: int = 0
    removed_files: int = 0
    added: int = 0
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    not_read: Counter[str] = field(default_factory=Counter)  # suffix -> files of no known type


# --- readers --------------------------------------------------------------------------------


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ReadError(f"not UTF-8 text (byte {exc.start})") from None


def read_text(data: bytes) -> list[Piece]:
    return [Piece(_text(data))]


class _Visible(HTMLParser):
    """The text a browser shows: no scripts, styles, head or comments; blocks on lines."""

    _HIDDEN: ClassVar[set[str]] = {"script", "style", "head", "template", "noscript"}
    _BLOCKS: ClassVar[set[str]] = {
        "p",
        "div",
        "br",
        "li",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "tr",
        "pre",
        "section",
    }

    def __init__(self, quotes: bool = True) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0
        self._hide = self._HIDDEN if quotes else self._HIDDEN | {"blockquote"}

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self._hide:
            self._hidden += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._hide:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


def html_text(html: str, quotes: bool = True) -> str:
    """The visible text of `html`; without `quotes`, no `<blockquote>` (a mail's quoted
    reply)."""
    parser = _Visible(quotes)
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def read_html(data: bytes) -> list[Piece]:
    return [Piece(html_text(_text(data)))]


_QUOTE_HEAD = re.compile(r"(?:On .+ wrote:|Le .+ a écrit :|Am .+ schrieb .+:)\s*")  # fullmatch


def own_words(body: str) -> str:
    """A mail body without what others wrote: quoted lines (`>`), the "On … wrote:" line
    that introduces them, a forwarded or original message below its marker, and the
    signature (after a line `-- `)."""
    kept: list[str] = []
    for line in body.splitlines():
        if line.rstrip() == "--" and line.startswith("--"):  # the signature separator "-- "
            break
        if re.search(r"\A-{2,}\s*(?:Original|Forwarded) Message\s*-{2,}", line.strip(), re.I):
            break
        if re.fullmatch(r"_{8,}", line.strip()):  # Outlook: a rule, then the quoted headers
            break
        if line.lstrip().startswith(">") or _QUOTE_HEAD.fullmatch(line.strip()):
            continue
        kept.append(line)
    return "\n".join(kept).strip()


def _body(message: Message) -> str:
    """The message's own text: its text/plain part, else its text/html one as text."""
    if not isinstance(message, EmailMessage):
        message = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    part = message.get_body(preferencelist=("plain", "html"))
    if part is None:
        return ""
    try:
        content = part.get_content()
    except (LookupError, ValueError) as exc:
        raise ReadError(f"a message part cannot be decoded ({exc})") from None
    html = part.get_content_type() == "text/html"
    return html_text(content, quotes=False) if html else content


def _date(message: Message) -> str | None:
    try:
        when = parsedate_to_datetime(str(message.get("date", "")))
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.isoformat(timespec="seconds")


def _mail_pieces(messages: Iterator[Message], me: Collection[str]) -> list[Piece]:
    if not me:
        raise ReadError("mail needs --me EMAIL to know which messages are yours")
    mine = {m.strip().lower() for m in me}
    pieces = []
    for n, message in enumerate(messages):
        senders = {a.lower() for _, a in getaddresses([str(message.get("from", ""))])}
        if not senders & mine:
            continue
        subject = " ".join(str(message.get("subject", "")).split())
        text = own_words(_body(message))
        if not text and not subject:
            continue
        whole = f"{subject}\n\n{text}".strip() if subject else text
        pieces.append(Piece(whole, MAIL_KIND, _date(message), f"message {n + 1}"))
    return pieces


def read_eml(data: bytes, me: Collection[str] = ()) -> list[Piece]:
    message = email.message_from_bytes(data, policy=email.policy.default)
    if not message.keys():
        raise ReadError("not a mail message (no headers)")
    return _mail_pieces(iter([message]), me)


def read_mbox(path: Path, me: Collection[str] = ()) -> list[Piece]:
    box = mailbox.mbox(path, create=False)
    try:
        keys = box.keys()
        if not keys and path.stat().st_size:
            raise ReadError("not an mbox file (no 'From ' line starts a message)")
        return _mail_pieces((box.get_message(k) for k in keys), me)
    finally:
        box.close()


def _when(seconds: Any) -> str | None:
    if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds > 0:
        try:
            return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")
        except (OverflowError, OSError, ValueError):
            return None
    return None


def read_chatgpt(data: bytes) -> list[Piece]:
    """The person's turns of a ChatGPT export (every branch: an edited question and the
    original are both theirs), oldest first within each conversation."""
    try:
        conversations = parse_json(_text(data), "the export")
    except InvalidInputError as exc:
        raise ReadError(str(exc).rstrip(".")) from None
    if not isinstance(conversations, list) or not all(
        isinstance(c, dict) and isinstance(c.get("mapping"), dict) for c in conversations
    ):
        raise ReadError("not a ChatGPT export (a list of conversations, each with a 'mapping')")
    pieces = []
    for c, conversation in enumerate(conversations):
        title = conversation.get("title") if isinstance(conversation.get("title"), str) else ""
        turns = []
        for node in conversation["mapping"].values():
            message = node.get("message") if isinstance(node, dict) else None
            if not isinstance(message, dict):
                continue
            author = message.get("author")
            if not isinstance(author, dict) or author.get("role") != "user":
                continue
            content = message.get("content")
            parts = content.get("parts") if isinstance(content, dict) else None
            text = "\n".join(p for p in parts or () if isinstance(p, str)).strip()
            if text:
                turns.append((message.get("create_time") or 0, text))
        turns.sort(key=lambda t: t[0] if isinstance(t[0], int | float) else 0)
        for t, (seconds, text) in enumerate(turns):
            where = f"conversation {c + 1} ({title or 'untitled'}), turn {t + 1}"
            pieces.append(Piece(text, CHAT_KIND, _when(seconds), where))
    return pieces


def read_chat_lines(data: bytes) -> list[Piece]:
    """The user's turns of chat messages as JSON lines (`{"role": ..., "content": ...}`)."""
    pieces = []
    for n, line in enumerate(_text(data).splitlines(), 1):
        if not line.strip():
            continue
        try:
            message = parse_json(line, f"line {n}")
        except InvalidInputError:
            raise ReadError(f"line {n} is not JSON (or not JSON this reads)") from None
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ReadError(f"line {n} is not a chat message (an object with a 'role')")
        content = message.get("content")
        if message["role"] == "user" and isinstance(content, str) and content.strip():
            pieces.append(Piece(content.strip(), CHAT_KIND, None, f"line {n}"))
    return pieces


def read_pdf(data: bytes) -> list[Piece]:
    """A PDF's text layer, a piece per page (a scanned page without one gives nothing)."""
    try:
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError
    except ImportError:
        raise ReadError(
            "a PDF needs pypdf, which is not installed; run `pip install 'edge-pllm[pdf]'`"
        ) from None
    import io
    import logging

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings are ours to report
    try:
        pages = PdfReader(io.BytesIO(data), strict=True).pages
        texts = [(page.extract_text() or "").strip() for page in pages]
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ReadError(f"not a readable PDF ({type(exc).__name__}: {exc})") from None
    return [Piece(text, NOTE_KIND, None, f"page {n}") for n, text in enumerate(texts, 1) if text]


Reader = Callable[[Path, bytes, Collection[str]], list[Piece]]

READERS: dict[str, Reader] = {
    **dict.fromkeys((".txt", ".md", ".markdown", ".rst", ".org"), lambda p, d, me: read_text(d)),
    **dict.fromkeys((".html", ".htm"), lambda p, d, me: read_html(d)),
    ".eml": lambda p, d, me: read_eml(d, me),
    ".mbox": lambda p, d, me: read_mbox(p, me),
    ".jsonl": lambda p, d, me: read_chat_lines(d),
    ".pdf": lambda p, d, me: read_pdf(d),
}
CHATGPT_EXPORT = "conversations.json"


def reader_for(path: Path) -> Reader | None:
    if path.name == CHATGPT_EXPORT:
        return lambda p, d, me: read_chatgpt(d)
    return READERS.get(path.suffix.lower())


# --- items ---------------------------------------------------------------------------------


def sections(text: str, limit: int = MAX_ITEM_CHARS) -> list[str]:
    """`text` as one section, or, when longer than `limit` characters, cut at part
    boundaries into sections of at most `limit`."""
    text = text.strip()
    if len(text) <= limit:
        return [text] if text else []
    found: list[str] = []
    start = stop = 0
    for a, b in part_spans(text):
        if b - start > limit and stop > start:
            found.append(text[start:stop].strip())
            start = a
        stop = b
    found.append(text[start:stop].strip())
    return [s for s in found if s]


def items_of(path: str, pieces: Sequence[Piece], written: str | None = None) -> list[NewItem]:
    """The pieces as history items, each naming its source (a piece over the item limit in
    sections); a piece without a date of its own is dated `written` (the file's
    modification time)."""
    items = []
    for piece in pieces:
        cut = sections(piece.text)
        for n, section in enumerate(cut, 1):
            source: dict[str, Any] = {"path": path}
            if piece.where:
                source["in"] = piece.where
            if len(cut) > 1:
                source["section"] = f"{n}/{len(cut)}"
            items.append(
                NewItem(
                    text=section,
                    kind=piece.kind,
                    created_at=piece.created_at or written,
                    metadata={"source": source},
                )
            )
    return items


# --- the walk -------------------------------------------------------------------------------


def walk(
    paths: Sequence[str | os.PathLike[str]], walked: set[Path] | None = None
) -> Iterator[tuple[Path, Path | None]]:
    """Every file under `paths` (files as given; folders recursively, hidden ones and
    symbolic links not followed), each with the folder it was found in (None: given);
    `walked` collects the folders listed whole (one that cannot be read is not)."""
    for given in paths:
        root = Path(given).expanduser().resolve()
        if not root.exists():
            raise InvalidInputError(f"{given} does not exist.", field="path")
        if root.is_file():
            yield root, None
            continue
        for folder, dirs, files in os.walk(root):
            if walked is not None:
                walked.add(Path(folder))
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                file = Path(folder) / name
                if not name.startswith(".") and file.is_file() and not file.is_symlink():
                    yield file, root


def _read(path: Path) -> tuple[SourceFile, bytes]:
    stat = path.stat()
    if stat.st_size > MAX_FILE_BYTES:
        raise ReadError(f"over {MAX_FILE_BYTES // 2**20} MB")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    return SourceFile(str(path), stat.st_size, stat.st_mtime_ns, digest), data


def import_paths(
    store: HistoryStore,
    embed: Embed,
    user: str,
    paths: Sequence[str | os.PathLike[str]],
    *,
    me: Collection[str] = (),
    progress: Callable[[Path], None] | None = None,
    again: bool = False,
    embedding: Embedding | None = None,
) -> ImportReport:
    """Import the files under `paths` into `user`'s history (see the module's doc);
    `progress` is called with each file as it is done, and `embedding` with a file and how
    many texts it gives before they are embedded (what it returns, if anything, is told
    how many are done as they are). With `again`, every file is read and its items
    replaced, changed or not (after an upgrade that reads files otherwise, or to bring
    back items deleted by hand)."""
    report = ImportReport()
    known = {r.file.path: r.file for r in store.sources(user)}
    roots: set[Path] = set()
    seen: set[str] = set()
    walked: set[Path] = set()  # folders read whole: only there is a missing file gone
    for path, root in walk(paths, walked):
        if root is not None:
            roots.add(root)
        if str(path) in seen:  # a file given and also found in a folder given: once
            continue
        seen.add(str(path))
        read = reader_for(path)
        if read is None:
            report.not_read[path.suffix.lower() or path.name] += 1
            continue
        report.files += 1
        try:
            if not _is_utf8(str(path)):
                raise ReadError("its name is not UTF-8 text; rename it")
            before = None if again else known.get(str(path))
            _import_file(store, embed, user, path, read, before, me, report, embedding)
        except (ReadError, InvalidInputError) as exc:
            report.skipped.append((str(path), str(exc)))
        except OSError as exc:
            report.skipped.append((str(path), exc.strerror or str(exc)))
        except Exception as exc:  # a reader's library failing on a hostile file: skip it
            report.skipped.append((str(path), f"cannot be read ({type(exc).__name__}: {exc})"))
        if progress is not None:
            progress(path)
    for path in known:
        file = Path(path)
        gone = file.parent in walked and any(file.is_relative_to(r) for r in roots)
        if gone and path not in seen and not os.path.lexists(path):
            report.removed += store.drop_source(user, path)
            report.removed_files += 1
    return report


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _import_file(
    store: HistoryStore,
    embed: Embed,
    user: str,
    path: Path,
    read: Reader,
    before: SourceFile | None,
    me: Collection[str],
    report: ImportReport,
    embedding: Embedding | None = None,
) -> None:
    stat = path.stat()
    if before is not None and (before.size, before.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
        report.unchanged += 1
        return
    source, data = _read(path)
    if before is not None and before.sha256 == source.sha256:
        store.touch_source(user, source)
        report.unchanged += 1
        return
    written = datetime.fromtimestamp(source.mtime_ns / 1e9, UTC).isoformat(timespec="seconds")
    items = items_of(str(path), read(path, data, me), written)
    texts = texts_to_embed(i.text for i in items)
    done = embedding(path, len(texts)) if embedding is not None else None
    vectors = embed(texts, done)
    added, removed = store.import_source(user, source, items, vectors)
    report.imported += 1
    report.added += added
    report.removed += removed
