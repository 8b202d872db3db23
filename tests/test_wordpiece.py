"""The device's own WordPiece gives the ids `tokenizers` gives, for the shipped embedder's
tokenizer.json, on real commit text, every character class, and random text."""

from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_pllm import defaults
from edge_pllm.errors import BundleError, MissingDependencyError
from edge_pllm.inference.wordpiece import WordPiece, load_tokenizer

tokenizers = pytest.importorskip("tokenizers", reason="the reference needs `tokenizers`")

TOKENIZER = defaults.shipped_bundle_dir() / "tokenizer.json"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "commit_subjects"
MAX_LENGTH = 256

SAMPLES = [
    "fix(parser): handle blank lines at the end of the file",
    "Was heißt das auf Deutsch? Ça marche très bien. İstanbul ΣΊΣΥΦΟΣ ǅemal ﬁle",
    "数据保存在本地设备上。 ｢half｣ width　space",
    "tabs\tand\nnew\r\nlines\x0bvertical\x0cfeed\x85next\u2028line\u00a0nbsp\u200bzwsp",
    "control \x00 nul \ufffd replacement \x1f unit \u00ad soft hyphen \ue000 private",
    "[CLS] [SEP] [MASK]ed [UNK][PAD] [cls] [[SEP]] [MAS K]",
    "Quranic \u08d3\u08e2 marks, Malayalam \u0d00\u0d3b, ⹝ and ⹅ punctuation, 👍🏽 emoji",
    "x" * 101 + " " + "y" * 100,
    "$HOME/.config ~user a+b<c>=d^e`f|g",
    "",
    "   ",
    "The tokenizer must truncate inputs at 256 word pieces. " * 40,
]


@pytest.fixture(scope="module")
def reference():
    ref = tokenizers.Tokenizer.from_file(str(TOKENIZER))
    ref.enable_truncation(max_length=MAX_LENGTH)
    ref.no_padding()
    return lambda texts: [e.ids for e in ref.encode_batch(list(texts))]


@pytest.fixture(scope="module")
def own() -> WordPiece:
    found = WordPiece.from_file(TOKENIZER, MAX_LENGTH)
    assert found is not None, "the shipped tokenizer.json is BERT's WordPiece"
    return found


def _real_texts() -> list[str]:
    if not (DATA / "dev_questions.json").is_file():
        return []
    questions = json.loads((DATA / "dev_questions.json").read_text())
    return [q["input"] for q in questions] + [
        p["text"] for q in questions for p in q["profile"][:20]
    ]


def test_the_same_ids_as_tokenizers_on_samples_and_commit_text(reference, own):
    texts = SAMPLES + _real_texts()
    assert own.encode_batch(texts) == reference(texts)


def test_the_same_ids_for_every_character_but_letters(reference, own):
    """Each code point that is not a letter or unassigned, alone, between letters, and
    inside a word: whether it is dropped, a space, punctuation, a mark or part of a word."""
    kept = ("Cc", "Cf", "M", "N", "P", "S", "Z")  # not L*, Cn, Co or Cs (surrogates)
    chars = [chr(cp) for cp in range(0x110000) if unicodedata.category(chr(cp)).startswith(kept)]
    texts = [f"{c} ab{c}cd e{c}" for c in chars]
    found, expected = own.encode_batch(texts), reference(texts)
    wrong = [hex(ord(c)) for c, a, b in zip(chars, found, expected, strict=True) if a != b]
    assert not wrong, f"{len(wrong)} characters differ: {wrong[:20]}"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_the_same_ids_on_random_text(reference, own, text):
    assert own.encode_batch([text]) == reference([text])


def test_truncated_to_max_length_with_the_ends_kept(own):
    ids = own.encode("word " * 1000)
    assert len(ids) == MAX_LENGTH
    assert ids[0] == own.encode("")[0] and ids[-1] == own.encode("")[-1]
    assert WordPiece.from_file(TOKENIZER, 8).encode("word " * 1000) == ids[:7] + ids[-1:]


def test_another_kind_of_tokenizer_goes_to_tokenizers(tmp_path: Path):
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    path = tmp_path / "tokenizer.json"
    bpe.save(str(path))
    assert WordPiece.from_file(path, MAX_LENGTH) is None
    assert load_tokenizer(path, MAX_LENGTH)(["a b"]) == [[]]


def test_without_tokenizers_another_kind_names_the_extra(tmp_path: Path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"type": "BPE"}}))
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as on a device install
    with pytest.raises(MissingDependencyError, match=r"edge-pllm\[tokenizers\]"):
        load_tokenizer(path, MAX_LENGTH)
    assert load_tokenizer(TOKENIZER, MAX_LENGTH)(["ok"])  # the shipped one needs nothing


@pytest.mark.parametrize("content", [b"\xff\xfe not text", b"{not json", b"[1, 2]"])
def test_an_unreadable_file_is_a_bundle_error(tmp_path: Path, content: bytes):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(BundleError, match=r"tokenizer\.json could not be read"):
        load_tokenizer(path, MAX_LENGTH)


NEW_TOKEN = {
    "id": 40000,
    "content": "<new>",
    "special": False,
    "single_word": False,
    "lstrip": False,
    "rstrip": False,
    "normalized": False,
}


@pytest.mark.parametrize(
    "change",
    [
        lambda spec: spec["added_tokens"][4].update(id=5000),  # [MASK] not at its vocab id
        lambda spec: spec["added_tokens"].append(NEW_TOKEN),  # one the vocabulary lacks
        lambda spec: spec["model"].update(continuing_subword_prefix=None),
        lambda spec: spec["normalizer"].update(lowercase="false"),
    ],
)
def test_an_odd_layout_gets_the_ids_tokenizers_gives(tmp_path, change):
    """Added tokens at other ids, or missing from the vocabulary, fields of the wrong type:
    the ids are those `tokenizers` gives (a layout not read exactly here goes to it), or
    the file is refused as `tokenizers` refuses it."""
    spec = json.loads(TOKENIZER.read_text())
    change(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    try:
        ref = tokenizers.Tokenizer.from_file(str(path))
    except Exception:
        with pytest.raises(BundleError):
            load_tokenizer(path, MAX_LENGTH)
        return
    ref.enable_truncation(max_length=MAX_LENGTH)
    ref.no_padding()
    texts = ["hello [MASK] world <new>", "Ünïcode and ##pieces"]
    assert load_tokenizer(path, MAX_LENGTH)(texts) == [e.ids for e in ref.encode_batch(texts)]
