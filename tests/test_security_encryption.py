"""Guarantee 5, encryption at rest (opt-in): with a passphrase the history database is a
SQLCipher file. Its bytes, and those of its write-ahead log, contain none of the history's
plaintext nor its vectors; sqlite-vec search works as before; a wrong passphrase, a missing
one, or one given for a plaintext database is a typed PassphraseError.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_pllm.cli import cli
from edge_pllm.errors import (
    EdgePLLMError,
    InvalidInputError,
    MissingDependencyError,
    PassphraseError,
)
from edge_pllm.storage import db as edge_db
from edge_pllm.storage.parts import texts_to_embed
from edge_pllm.storage.store import HistoryStore

pytest.importorskip("sqlcipher3", reason="encryption needs the [encryption] extra")

DIM = 384
PASS = "correct horse battery staple ' \" ; --"  # quotes must not break the key pragma
MARKER = "ENCRYPTED-MARKER-9d41"


def files_of(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())


def unit(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_no_plaintext_and_no_vector_bytes_on_disk(tmp_path: Path, report_counts):
    db = tmp_path / "secret.db"
    texts = [f"{MARKER} item {i}: my medical notes" for i in range(4)]
    texts.append(f"{MARKER} long " + "very private words " * 1200)
    vecs = unit(len(texts_to_embed(texts)))  # the long item's parts have vectors too
    with HistoryStore(db, DIM, passphrase=PASS) as store:
        assert store.driver == "sqlcipher3" and store.encrypted
        store.add("alice", texts, vecs)
        # While open, the newest pages sit in the -wal: check it too.
        data = files_of(db)
        assert Path(f"{db}-wal").exists()
        hits = store.search("alice", vecs[2], 1)
        assert hits[0].item.text == texts[2]
    data += files_of(db)
    assert not data.startswith(b"SQLite format 3")
    vec_pieces = [v.tobytes()[i : i + 32] for v in vecs for i in range(0, 4 * DIM, 32)]
    for needle in (MARKER.encode(), b"alice", b"medical", b"history_vec", *vec_pieces):
        assert needle not in data, needle
    # The same content unencrypted does show the marker (the search would find it).
    with HistoryStore(tmp_path / "plain.db", DIM) as plain:
        plain.add("alice", texts, vecs)
        assert MARKER.encode() in files_of(tmp_path / "plain.db")
    # Reopened with the passphrase, everything is there.
    with HistoryStore(db, DIM, passphrase=PASS) as store:
        assert [i.text for i in store.items("alice", newest_first=False)] == texts
        assert store.integrity()["integrity_check"] == "ok"
    report_counts(f"{len(data):,} encrypted bytes searched for plaintext and vectors: 0 found")


def test_wrong_missing_and_unexpected_passphrases_are_typed_errors(tmp_path: Path):
    db = tmp_path / "secret.db"
    with HistoryStore(db, DIM, passphrase=PASS) as store:
        store.add("alice", ["hello"], unit(1))
    before = db.read_bytes()
    with pytest.raises(PassphraseError) as err:
        HistoryStore(db, DIM, passphrase=PASS + "x")
    assert err.value.reason == "wrong" and err.value.path == str(db)
    assert "passphrase is wrong" in str(err.value)
    with pytest.raises(PassphraseError) as err:
        HistoryStore(db, DIM)  # no passphrase for an encrypted file
    assert err.value.reason == "missing"
    plain = tmp_path / "plain.db"
    HistoryStore(plain, DIM).close()
    with pytest.raises(PassphraseError) as err:
        HistoryStore(plain, DIM, passphrase=PASS)
    assert err.value.reason == "unencrypted"
    for bad in ("", "a\x00b"):
        with pytest.raises(InvalidInputError):
            HistoryStore(tmp_path / "new.db", DIM, passphrase=bad)
    assert db.read_bytes() == before  # failed opens changed nothing
    assert isinstance(err.value, EdgePLLMError)


def test_missing_binding_names_the_install_command(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sqlcipher3.dbapi2", None)  # import fails
    with pytest.raises(MissingDependencyError, match=r"pip install 'edge-pllm\[encryption\]'"):
        edge_db.connect(tmp_path / "x.db", passphrase=PASS)


def test_backup_of_an_encrypted_store_is_encrypted(tmp_path: Path):
    db, copy = tmp_path / "secret.db", tmp_path / "copy.db"
    with HistoryStore(db, DIM, passphrase=PASS) as store:
        store.add("alice", [f"{MARKER} backup me"], unit(1))
        store.backup(copy)
    assert MARKER.encode() not in copy.read_bytes()
    with HistoryStore(copy, DIM, passphrase=PASS) as restored:
        assert restored.items("alice")[0].text == f"{MARKER} backup me"


def test_cli_with_passphrase_file_and_env(
    default_bundle: Path, isolated_home: Path, tmp_path: Path, monkeypatch
):
    secret = tmp_path / "pass.txt"
    secret.write_text(PASS + "\n")
    runner = CliRunner()
    base = ["--bundle", str(default_bundle), "--n-ctx", "1024"]
    added = runner.invoke(cli, [*base, "--passphrase-file", str(secret), "add", "alice", MARKER])
    assert added.exit_code == 0, added.output
    db = isolated_home / "history.db"
    assert MARKER.encode() not in files_of(db)
    monkeypatch.setenv("EDGE_PLLM_PASSPHRASE", PASS)
    listed = runner.invoke(cli, [*base, "items", "alice", "--json"])
    assert listed.exit_code == 0 and json.loads(listed.output)["text"] == MARKER
    monkeypatch.setenv("EDGE_PLLM_PASSPHRASE", "not it")
    wrong = runner.invoke(cli, [*base, "items", "alice"])
    assert wrong.exit_code == 1 and "passphrase is wrong" in wrong.output
    assert "Traceback" not in wrong.output
    monkeypatch.delenv("EDGE_PLLM_PASSPHRASE")
    missing = runner.invoke(cli, [*base, "users"])
    assert missing.exit_code == 1 and "is encrypted" in missing.output
    asked = runner.invoke(cli, [*base, "--ask-passphrase", "users"], input=PASS + "\n")
    assert asked.exit_code == 0 and "alice\t1 item" in asked.output


def test_encrypted_erasure_and_search_match_plaintext_behaviour(tmp_path: Path):
    db = tmp_path / "secret.db"
    vecs = unit(4, seed=5)
    with HistoryStore(db, DIM, passphrase=PASS) as store:
        ids = store.add("bob", [f"bob {i}" for i in range(4)], vecs)
        assert store.search("bob", vecs[3], 2)[0].item.id == ids[3]
        store.delete("bob", [ids[0]])
        assert store.forget("bob") == 3
        assert store.users() == []
        assert store.integrity()["integrity_check"] == "ok"
