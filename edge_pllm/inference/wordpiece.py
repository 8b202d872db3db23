"""The embedder's tokenizer on the device: BERT's WordPiece read from the bundle's
`tokenizer.json`, in plain Python.

The `tokenizers` package brings a model-hub client (huggingface-hub, httpx, hf-xet) with
it, and a device that never goes online has no use for one. The sentence encoders
edge-pllm exports (BERT's family: all-MiniLM-L6-v2 ships by default) describe their
tokenizer with four parts, each rebuilt here as `tokenizers` runs it: the added tokens
(`[CLS]`, `[MASK]`...) matched in the raw text, `BertNormalizer` (control characters out,
whitespace to spaces, CJK ideographs spaced, accents stripped, lower case),
`BertPreTokenizer` (words split at whitespace and punctuation) and `WordPiece` (greedy
longest match, `##` continuations, `[UNK]` for a word it cannot spell), then the
`[CLS] A [SEP]` template. tests/test_wordpiece.py checks the ids against `tokenizers`, for
every character that is not a letter and on random text. Characters are classed by
Python's Unicode tables (`unicodedata`, Unicode 14.0 on Python 3.11), corrected where
those of `tokenizers` are older (`_OLD_CLASS`). On Python 3.12 and later (Unicode 15 and
on), the few hundred marks and punctuation assigned since 14.0 (Kawi, Nag Mundari, ...) are
classed by the newer tables while `tokenizers` reads them as letters: words holding them
get other ids there (that test shows which).

A tokenizer of another kind (BPE, Unigram...) is read by `tokenizers` itself, which
`pip install 'edge-pllm[tokenizers]'` adds.
"""

from __future__ import annotations

import json
import string
import unicodedata
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError, MissingDependencyError

Encode = Callable[[Sequence[str]], list[list[int]]]

_ASCII_PUNCTUATION = frozenset(string.punctuation)
_CJK = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
# Where the Unicode tables of `tokenizers` (0.22: an older Unicode than Python 3.11's 14.0)
# class a character otherwise: marks (Mn), format characters (Cf) and punctuation (P*) it
# does not know, which it reads as letters, and three that changed class since.
_AS_LETTERS = (
    "7FD 898-89F 8CA-8E1 9FE AFA-AFF B55 C04 C3C D00 D3B-D3C D81 EBA 180F 1885-1886 1ABF-1ACE"
    " 1DF6-1DFB A82C A8C5 A8FF A9BD 10D24-10D27 10EAB-10EAC 10F46-10F50 10F82-10F85 11070"
    " 11073-11074 110C2 111CF 1123E 1133B 11438-1143F 11442-11444 11446 1145E"
    " 1182F-11837 11839-1183A 1193B-1193C 1193E 11943 119D4-119D7 119DA-119DB 119E0"
    " 11A01-11A0A 11A33-11A38 11A3B-11A3E 11A47 11A51-11A56 11A59-11A5B 11A8A-11A96"
    " 11A98-11A99 11C30-11C36 11C38-11C3D 11C3F 11C92-11CA7 11CAA-11CB0 11CB2-11CB3"
    " 11CB5-11CB6 11D31-11D36 11D3A 11D3C-11D3D 11D3F-11D45 11D47 11D90-11D91 11D95 11D97"
    " 11EF3-11EF4 16F4F 16FE4 1CF00-1CF2D 1CF30-1CF46 1E000-1E006 1E008-1E018 1E01B-1E021"
    " 1E023-1E024 1E026-1E02A 1E130-1E136 1E2AE 1E2EC-1E2EF 1E944-1E94A"  # Mn
    " 890-891 8E2 110CD 13430-13438"  # Cf
    " 61D 9FD A76 C77 C84 1B7D-1B7E 2E43-2E4F 2E52-2E5D 10EAD 10F55-10F59 10F86-10F89"
    " 1144B-1144F 1145A-1145B 1145D 11660-1166C 116B9 1183B 11944-11946 119E2 11A3F-11A46"
    " 11A9A-11A9C 11A9E-11AA2 11C41-11C45 11C70-11C71 11EF7-11EF8 11FFF 12FF1-12FF2"
    " 16E97-16E9A 16FE2 1E95E-1E95F"  # P*
)
_OLD_CLASS = {
    **{
        cp: ""
        for span in _AS_LETTERS.split()
        for lo, _, hi in [span.partition("-")]
        for cp in range(int(lo, 16), int(hi or lo, 16) + 1)
    },
    0x166D: "punct",  # So, once Po
    0x111C9: "punct",  # Mn, once Po
    0x1734: "mark",  # Mc, once Mn
}


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK)


@lru_cache(maxsize=4096)
def _char_class(ch: str) -> str:
    """'drop', 'space', 'cjk', 'punct', 'mark' (a nonspacing mark, which accents strip)
    or '' for a character, as BertNormalizer and BertPreTokenizer see it."""
    if ch in "\t\n\r ":
        return "space"
    if ord(ch) in _OLD_CLASS:
        return _OLD_CLASS[ord(ch)]
    category = unicodedata.category(ch)
    if ch in ("\x00", "\ufffd") or category in ("Cc", "Cf", "Co", "Cs"):  # not Cn
        return "drop"
    if category in ("Zs", "Zl", "Zp"):  # Unicode's White_Space, less the controls
        return "space"
    if _is_cjk(ord(ch)):
        return "cjk"
    if ch in _ASCII_PUNCTUATION or category[0] == "P":
        return "punct"
    return "mark" if category == "Mn" else ""


class WordPiece:
    """`encode_batch(texts)`: each text's token ids, `[CLS]` first and `[SEP]` last, at
    most `max_length` ids (the text's tail cut, as `tokenizers` truncates one sequence)."""

    def __init__(
        self,
        vocab: dict[str, int],
        *,
        specials: dict[str, int],
        unk: str,
        prefix: str,
        max_chars: int,
        lowercase: bool,
        strip_accents: bool,
        cls: int,
        sep: int,
        max_length: int,
    ):
        self._vocab = vocab
        self._specials = dict(sorted(specials.items(), key=lambda kv: -len(kv[0])))
        self._unk = vocab[unk]
        self._prefix = prefix
        self._max_chars = max_chars
        self._lowercase = lowercase
        self._strip_accents = strip_accents
        self._cls, self._sep = cls, sep
        self.max_length = max_length

    @classmethod
    def from_file(cls, path: str | Path, max_length: int) -> WordPiece | None:
        """The tokenizer that `path` describes, or None when it is not BERT's WordPiece
        as described above (BundleError if the file cannot be read at all)."""
        try:
            spec = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise _unreadable(path, exc) from None
        return cls.from_spec(spec, max_length) if isinstance(spec, dict) else None

    @classmethod
    def from_spec(cls, spec: dict[str, Any], max_length: int) -> WordPiece | None:
        try:
            return cls._from_spec(spec, max_length)
        except (AttributeError, KeyError, TypeError, ValueError, StopIteration):
            return None  # not laid out as described: `tokenizers` reads it, or says why not

    @classmethod
    def _from_spec(cls, spec: dict[str, Any], max_length: int) -> WordPiece | None:
        model, norm = spec.get("model") or {}, spec.get("normalizer") or {}
        pre, post = spec.get("pre_tokenizer") or {}, spec.get("post_processor") or {}
        added = spec.get("added_tokens") or []
        if (
            model.get("type") != "WordPiece"
            or norm.get("type") != "BertNormalizer"
            or not norm.get("clean_text", True)
            or not norm.get("handle_chinese_chars", True)
            or pre.get("type") != "BertPreTokenizer"
            or post.get("type") != "TemplateProcessing"
            or any(t.get("normalized") or t.get("lstrip") or t.get("rstrip") for t in added)
            or any(t.get("single_word") for t in added)
        ):
            return None
        template = post.get("single") or []
        shape = [next(iter(part)) for part in template]
        if shape != ["SpecialToken", "Sequence", "SpecialToken"]:
            return None
        special = post.get("special_tokens") or {}
        ends = [special.get(part["SpecialToken"]["id"], {}).get("ids") for part in template[::2]]
        if not all(isinstance(ids, list) and len(ids) == 1 for ids in ends):
            return None
        vocab = model.get("vocab")
        unk = model.get("unk_token", "[UNK]")
        prefix = model.get("continuing_subword_prefix", "##")
        max_chars = model.get("max_input_chars_per_word", 100)
        lowercase, strip = norm.get("lowercase", True), norm.get("strip_accents")
        if (
            not isinstance(vocab, dict)
            or unk not in vocab
            or not all(isinstance(k, str) and type(v) is int for k, v in vocab.items())
            or not isinstance(prefix, str)
            or type(max_chars) is not int
            or not isinstance(lowercase, bool)
            or not (strip is None or isinstance(strip, bool))
            or not all(type(end[0]) is int for end in ends)
        ):
            return None
        # `tokenizers` gives an added token its id in the vocabulary (one the vocabulary
        # lacks gets an id of its own choosing, not read here).
        contents = [t.get("content") for t in added]
        if not all(isinstance(c, str) and c in vocab for c in contents):
            return None
        return cls(
            vocab,
            specials={c: vocab[c] for c in contents if c},
            unk=unk,
            prefix=prefix,
            max_chars=max_chars,
            lowercase=lowercase,
            strip_accents=lowercase if strip is None else strip,
            cls=ends[0][0],
            sep=ends[1][0],
            max_length=max_length,
        )

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode(self, text: str) -> list[int]:
        ids = [self._cls]
        for piece, special in self._split_specials(text):
            if special is not None:
                ids.append(special)
                continue
            for word in self._words(piece):
                ids.extend(self._word_ids(word))
        if self.max_length >= 2:  # as `tokenizers`: below room for the markers, no cut
            del ids[self.max_length - 1 :]
        ids.append(self._sep)
        return ids

    def _split_specials(self, text: str) -> list[tuple[str, int | None]]:
        """`text` cut at the added tokens it holds (matched as written, leftmost first,
        the longest where several start at one place), each with its id."""
        if not any(s in text for s in self._specials):
            return [(text, None)]
        out: list[tuple[str, int | None]] = []
        start = i = 0
        while i < len(text):
            match = next((s for s in self._specials if text.startswith(s, i)), None)
            if match is None:
                i += 1
                continue
            out.append((text[start:i], None))
            out.append((match, self._specials[match]))
            i = start = i + len(match)
        out.append((text[start:], None))
        return out

    def _words(self, text: str) -> list[str]:
        """The normalized words and punctuation marks of `text`."""
        if self._strip_accents:
            text = unicodedata.normalize("NFD", text)
        words: list[str] = []
        word: list[str] = []
        for ch in text:
            kind = _char_class(ch)
            if kind == "drop" or (kind == "mark" and self._strip_accents):
                continue
            if kind in ("", "mark"):
                word.append(ch.lower() if self._lowercase else ch)
                continue
            if word:
                words.append("".join(word))
                word = []
            if kind != "space":  # punctuation and CJK ideographs: a word of their own
                words.append(ch.lower() if self._lowercase else ch)
        if word:
            words.append("".join(word))
        return words

    def _word_ids(self, word: str) -> list[int]:
        if len(word) > self._max_chars:
            return [self._unk]
        vocab, ids, start = self._vocab, [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else self._prefix + word[start:end]
                found = vocab.get(piece)
                if found is not None:
                    ids.append(found)
                    break
                end -= 1
            else:
                return [self._unk]
            start = end
        return ids


def load_tokenizer(path: str | Path, max_length: int) -> Encode:
    """`encode_batch` for the tokenizer at `path`: WordPiece here, any other kind through
    the `tokenizers` package (MissingDependencyError when it is not installed)."""
    own = WordPiece.from_file(path, max_length)
    if own is not None:
        return own.encode_batch
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MissingDependencyError(
            "tokenizers", "tokenizers", f"The embedder's tokenizer {path} (not one read here)"
        ) from None
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a broken file
        raise _unreadable(path, exc) from exc
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.no_padding()
    return lambda texts: [e.ids for e in tokenizer.encode_batch(list(texts))]


def pad(encodings: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids -> (input_ids, attention_mask), both (len(encodings), longest) int64,
    right-padded with id 0 and mask 0."""
    width = max((len(ids) for ids in encodings), default=0)
    ids = np.zeros((len(encodings), width), dtype=np.int64)
    mask = np.zeros((len(encodings), width), dtype=np.int64)
    for row, found in enumerate(encodings):
        ids[row, : len(found)] = found
        mask[row, : len(found)] = 1
    return ids, mask


def _unreadable(path: str | Path, exc: BaseException) -> BundleError:
    return BundleError(
        f"The tokenizer {path} could not be read ({exc}); rebuild the bundle with "
        "`edge-pllm setup --rebuild`.",
        file=str(path),
    )
