"""Private files (issue #19, item 6), `backup` destinations (item 7) and a garbage history.db
(item 9): on real SQLite, sqlite-vec and SQLCipher, no mocks.

The class test: under a umask of 022 (what most accounts run with), every folder and file
that edge-pllm leaves under its home after real use is owner-only: 0o700 folders, 0o600
files. `open_to_others` walks the whole tree, so a file added by a later feature is
checked without anyone remembering to.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_pllm import paths
from edge_pllm.cli import cli
from edge_pllm.errors import InvalidInputError, PassphraseError
from edge_pllm.files import (
    atomic_write,
    copy_private,
    new_private_file,
    open_private,
    private_dir,
    private_file,
    replacing,
    replacing_folder,
)
from edge_pllm.storage.db import file_kind
from edge_pllm.storage.store import HistoryStore
from edge_pllm.storage.vector_cache import VectorCache

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")

DIM = 8
PASS = "correct horse battery staple"


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    """The usual umask, under which plain creation gives 0o644 files and 0o755 folders."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def open_to_others(root: Path) -> list[str]:
    """Every folder and file under `root` (itself included) with any group or other
    permission, as 'path mode'. Links are reported too: nothing here should make one."""
    found = []
    for folder, dirs, files in os.walk(root):
        for path in [Path(folder)] + [Path(folder) / n for n in files + dirs]:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                found.append(f"{path} is a link")
            elif stat.S_IMODE(st.st_mode) & 0o077:
                found.append(f"{path} {stat.S_IMODE(st.st_mode):o}")
    return sorted(set(found))


def every_path(root: Path) -> list[Path]:
    return [Path(f) / n for f, ds, fs in os.walk(root) for n in fs + ds]


def unit(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_the_umask_would_make_files_readable_without_the_helpers(tmp_path: Path):
    """The control: plain creation under this umask is open to others, so the tests below
    pass because of the helpers, not because of the umask."""
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    sqlite3.connect(tmp_path / "plain.db").execute("CREATE TABLE t (x)").connection.close()
    assert mode(tmp_path / "plain.txt") == mode(tmp_path / "plain.db") == 0o644
    assert mode(tmp_path / "plain") == 0o755


# --- the class test: a home after real use ------------------------------------------------


def count_tree(root: Path) -> str:
    entries = [root, *every_path(root)]
    folders = sum(p.is_dir() for p in entries)
    files = len(entries) - folders
    return f"{folders} folder{'s' * (folders != 1)} and {files} file{'s' * (files != 1)}"


def test_a_used_home_is_owner_only(pllm, isolated_home: Path, tmp_path: Path, report_counts):
    """add, search, delete, backup (in and out of the home), all through PersonalLLM."""
    ids = pllm.add("alice", ["fix: typo in docs", "feat: add a json flag", "perf: cache it"])
    pllm.add("bob", "chore: bump deps")
    query = pllm.embedder.embed(["caching"])[0]
    assert pllm.store.search("alice", query, 2)
    # While the store is open its -wal and -shm exist: SQLite made them with the db's mode.
    side = {p.name for p in isolated_home.iterdir()}
    assert {"history.db", "history.db-wal", "history.db-shm"} <= side
    pllm.delete("alice", ids[:1])
    inside = pllm.store.backup(isolated_home / "backups-made-by-hand.db")
    outside = pllm.store.backup(tmp_path / "copy.db")
    assert inside.stat().st_size > 0 and mode(outside) == 0o600
    assert open_to_others(isolated_home) == []
    assert mode(isolated_home) == 0o700
    seen = count_tree(isolated_home)
    pllm.close()
    assert open_to_others(isolated_home) == []
    report_counts(f"umask 022, PersonalLLM: {seen} under the home: 0 open to others")


def test_a_home_used_through_the_cli_is_owner_only(
    default_bundle: Path, isolated_home: Path, tmp_path: Path, report_counts
):
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli, ["--bundle", str(default_bundle), *args])
        assert result.exit_code == 0, result.output
        return result.output

    run("add", "alice", "fix: typo in docs", "feat: add a json flag")
    lines = tmp_path / "more.jsonl"
    lines.write_text(json.dumps({"text": "perf: cache vectors"}) + "\n")
    run("load", "bob", str(lines))
    assert "perf: cache vectors" in run("search", "bob", "caching", "-k", "1")
    run("backup", str(isolated_home / "copy.db"))
    run("forget", "bob", "--yes")
    run("status")
    assert open_to_others(isolated_home) == []
    assert "history.db" in {p.name for p in every_path(isolated_home)}
    report_counts(f"umask 022, CLI: {count_tree(isolated_home)} under the home: 0 open to others")


def test_a_dump_through_the_cli_is_owner_only(default_bundle: Path, isolated_home: Path):
    runner = CliRunner()
    base = ["--bundle", str(default_bundle)]
    assert runner.invoke(cli, [*base, "add", "alice", "fix: typo"]).exit_code == 0
    out = isolated_home / "alice.jsonl"
    dumped = runner.invoke(cli, [*base, "dump", "alice", "-o", str(out)])
    assert dumped.exit_code == 0, dumped.output
    assert out.read_text().strip()
    assert open_to_others(isolated_home) == []


def test_an_encrypted_home_is_owner_only(isolated_home: Path, tmp_path: Path):
    pytest.importorskip("sqlcipher3")
    home = paths.home()
    with HistoryStore(paths.database_path(home), DIM, passphrase=PASS) as store:
        store.add("alice", ["secret one", "secret two"], unit(2))
        assert (home / "history.db-wal").exists()
        assert open_to_others(home) == []
        store.delete("alice", [1])
        copy = store.backup(tmp_path / "copy.db")
    assert mode(copy) == 0o600
    with HistoryStore(copy, DIM, passphrase=PASS) as restored:
        assert [i.text for i in restored.items("alice")] == ["secret two"]
    assert open_to_others(home) == []


def test_the_vector_cache_and_its_folder_are_owner_only(isolated_home: Path):
    home = paths.home()
    path = home / "cache" / "deeper" / "vectors-0123.sqlite"

    def embed(texts: list[str]) -> np.ndarray:
        return unit(len(texts))

    with VectorCache(path, embed, DIM) as cache:
        cache.vectors(["a", "b"])
    path.write_bytes(b"not a cache" * 100)  # set aside as .damaged, started anew
    with pytest.warns(UserWarning, match="unreadable"), VectorCache(path, embed, DIM) as cache:
        cache.vectors(["c"])
    assert path.with_name(path.name + ".damaged").is_file()
    assert open_to_others(home) == []


def test_sqlite_gives_its_side_files_the_database_files_mode(tmp_path: Path):
    """What the pre-created 0o600 database relies on: SQLite creates -journal, -wal and -shm
    with the database file's mode (its unix VFS, findCreateFileMode), not the umask's."""
    rollback = tmp_path / "rollback.db"
    private_file(rollback)
    conn = sqlite3.connect(rollback, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (zeroblob(100000))")
    assert (tmp_path / "rollback.db-journal").exists()
    assert mode(tmp_path / "rollback.db-journal") == 0o600
    conn.execute("COMMIT")
    conn.close()
    wal = tmp_path / "wal.db"
    private_file(wal)
    conn = sqlite3.connect(wal)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    assert mode(tmp_path / "wal.db-wal") == mode(tmp_path / "wal.db-shm") == 0o600
    conn.close()
    assert open_to_others(tmp_path) == []


# --- a home of an earlier release ---------------------------------------------------------


def test_an_earlier_home_is_tightened_when_opened_and_says_so(tmp_path: Path):
    home = tmp_path / "old-home"
    home.mkdir()
    db = paths.database_path(home)
    with HistoryStore(db, DIM) as writer:
        writer.add("alice", ["kept"], unit(1))
        # As an earlier release left them: all open to others, -wal and -shm included.
        for p in [home, *home.iterdir()]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        assert len(open_to_others(home)) == 4
        with pytest.warns(UserWarning, match=r"owner-only.*old-home \(mode 755 to 700\)"):
            assert paths.home(home) == home
        with pytest.warns(UserWarning, match=r"history\.db \(mode 644 to 600\).*-wal.*-shm"):
            reader = HistoryStore(db, DIM)
        with reader:
            assert reader.count("alice") == 1
    assert open_to_others(home) == []


def test_a_shared_folder_given_as_home_is_left_as_it_is(tmp_path: Path, monkeypatch):
    """Only a folder of edge-pllm's own is tightened: not a sticky one like /tmp, not the
    account's home folder (its files are owner-only all the same)."""
    sticky = tmp_path / "shared"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    paths.home(sticky)
    assert stat.S_IMODE(sticky.stat().st_mode) == 0o1777
    account = tmp_path / "account"
    account.mkdir(mode=0o755)
    monkeypatch.setenv("HOME", str(account))
    paths.home(account)
    with HistoryStore(paths.database_path(account), DIM) as store:
        store.add("alice", ["x"], unit(1))
    assert mode(account) == 0o755
    assert [p for p in open_to_others(account) if not p.endswith(" 755")] == []


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give a file away"
)
def test_files_of_another_account_are_never_tightened(tmp_path: Path):
    from edge_pllm.files import tighten

    theirs = tmp_path / "theirs.db"
    theirs.write_bytes(b"")
    os.chown(theirs, 4242, 4242)
    assert tighten(theirs) == [] and mode(theirs) == 0o644
    mine = tmp_path / "mine.db"
    mine.write_bytes(b"")
    with pytest.warns(UserWarning, match="mine.db"):
        assert tighten(mine, theirs) == [str(mine)]
    assert mode(mine) == 0o600 and mode(theirs) == 0o644


# --- the helpers, under any umask ---------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o000, 0o077])
def test_the_helpers_make_owner_only_whatever_the_umask(tmp_path: Path, umask: int):
    os.umask(umask)
    assert private_dir(tmp_path / "a" / "b" / "c") == tmp_path / "a" / "b" / "c"
    private_dir(tmp_path / "a" / "b" / "c")  # there already: fine
    atomic_write(tmp_path / "a" / "manifest.json", "{}")
    with replacing(tmp_path / "a" / "model.bin") as tmp:
        tmp.write_bytes(b"model")
    with replacing_folder(tmp_path / "new" / "bundle") as work:
        (work / "x").mkdir()  # what the block makes is its own business
        os.chmod(work / "x", 0o700)
    private_file(tmp_path / "a" / "db.sqlite")
    new_private_file(tmp_path / "a" / "copy.db")
    with open_private(tmp_path / "a" / "dump.jsonl") as fh:
        fh.write("{}\n")
    source = tmp_path / "source.bin"
    source.write_bytes(b"shipped")
    os.chmod(source, 0o600)
    assert copy_private(source, tmp_path / "a" / "copied.bin").read_bytes() == b"shipped"
    assert open_to_others(tmp_path) == []


def test_open_private_tightens_a_file_it_overwrites_and_refuses_links(tmp_path: Path):
    old = tmp_path / "old.jsonl"
    old.write_text("previous content\n")
    assert mode(old) == 0o644
    with open_private(old) as fh:
        fh.write("new\n")
    assert old.read_text() == "new\n" and mode(old) == 0o600
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "link").symlink_to(victim)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name in ("link", "dangling"):
        with pytest.raises(InvalidInputError, match="symbolic link"):
            open_private(tmp_path / name)
    assert victim.read_text() == "keep" and not (tmp_path / "nowhere").exists()
    before = os.stat(os.devnull)
    with open_private(os.devnull) as fh:  # a device is written as it is, never chmod-ed
        fh.write("x")
    assert os.stat(os.devnull).st_mode == before.st_mode
    with pytest.raises(InvalidInputError, match="does not exist"):
        open_private(tmp_path / "missing" / "dump.jsonl")


def test_the_default_bundle_folders_are_owner_only_and_the_linked_llm_is_untouched(
    isolated_home: Path,
):
    """The LLM file is a hard link to the installed package's file (not ours to chmod)."""
    from edge_pllm.defaults import default_llm_source, ensure_default_bundle

    installed = default_llm_source()
    before = os.stat(installed)
    bundle = ensure_default_bundle(paths.home())
    folders = [p for p in [isolated_home, *every_path(isolated_home)] if p.is_dir()]
    assert {bundle, bundle.parent} <= set(folders)
    assert [f"{p} {mode(p):o}" for p in folders if mode(p) != 0o700] == []
    assert os.stat(installed).st_mode == before.st_mode
    made_here = [p for p in every_path(isolated_home) if p.is_file() and p.stat().st_nlink == 1]
    assert (bundle / ".verified.json") in made_here and mode(bundle / ".verified.json") == 0o600


def test_the_default_bundle_files_made_here_are_owner_only(isolated_home: Path):
    from edge_pllm.defaults import ensure_default_bundle

    ensure_default_bundle(paths.home())
    made_here = [p for p in every_path(isolated_home) if p.is_file() and p.stat().st_nlink == 1]
    assert [f"{p} {mode(p):o}" for p in made_here if mode(p) != 0o600] == []


# --- backup destinations --------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    with HistoryStore(tmp_path / "history.db", DIM) as s:
        s.add("alice", ["a", "b"], unit(2))
        yield s


def test_a_backup_is_born_owner_only_and_whole(store: HistoryStore, tmp_path: Path):
    dest = store.backup(tmp_path / "copy.db")
    assert dest == tmp_path / "copy.db" and dest.is_absolute()
    assert mode(dest) == 0o600
    with HistoryStore(dest, DIM) as copy:
        assert copy.count("alice") == 2 and copy.vector_count("alice") == 2


def test_a_uri_like_backup_name_is_a_file_name(store, tmp_path: Path, monkeypatch):
    """'file:copy.db?mode=memory' once reported success and wrote nothing (SQLite read it as
    a URI); it is a file name like any other."""
    monkeypatch.chdir(tmp_path)
    dest = store.backup("file:copy.db?mode=memory")
    assert dest == tmp_path / "file:copy.db?mode=memory"
    assert dest.stat().st_size > 0 and mode(dest) == 0o600
    with HistoryStore(dest, DIM) as copy:
        assert copy.count("alice") == 2


def test_a_backup_never_follows_a_link(store: HistoryStore, tmp_path: Path):
    (tmp_path / "dangling").symlink_to(tmp_path / "target.db")
    victim = tmp_path / "victim.db"
    victim.write_bytes(b"")
    (tmp_path / "link").symlink_to(victim)
    for name in ("dangling", "link"):
        with pytest.raises(InvalidInputError, match="symbolic link") as err:
            store.backup(tmp_path / name)
        assert err.value.field == "dest"
    assert not (tmp_path / "target.db").exists() and victim.read_bytes() == b""


@pytest.mark.parametrize(
    "where, says",
    [
        ("missing/copy.db", "does not exist"),
        ("history.db/copy.db", "is not a folder"),
        ("history.db", "already exists"),
        ("", "is a folder"),
        (".", "is a folder"),
    ],
)
def test_a_backup_destination_that_cannot_be_made_is_one_sentence(
    store: HistoryStore, tmp_path: Path, where: str, says: str
):
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InvalidInputError, match=says) as err:
        store.backup(tmp_path / where if where else where)
    assert err.value.field == "dest" and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anyway")
def test_a_backup_into_an_unwritable_folder_is_one_sentence(store: HistoryStore, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(InvalidInputError, match="permission denied"):
        store.backup(locked / "copy.db")


def test_a_failed_vacuum_leaves_no_empty_backup(store: HistoryStore, tmp_path: Path):
    """A backup SQLite cannot write (here: the store is closed) removes the file made for it."""
    store.close()
    with pytest.raises(InvalidInputError, match=r"Cannot back up to .*closed database"):
        store.backup(tmp_path / "copy.db")
    assert not (tmp_path / "copy.db").exists()


def test_the_cli_backup_errors_are_one_sentence(
    default_bundle: Path, isolated_home: Path, tmp_path: Path
):
    runner = CliRunner()
    base = ["--bundle", str(default_bundle)]
    assert runner.invoke(cli, [*base, "add", "alice", "x"]).exit_code == 0
    (tmp_path / "dangling").symlink_to(tmp_path / "target.db")
    for dest, says in [
        (tmp_path / "missing" / "copy.db", "does not exist"),
        (tmp_path / "dangling", "symbolic link"),
    ]:
        result = runner.invoke(cli, [*base, "backup", str(dest)])
        assert result.exit_code != 0 and says in result.output, result.output
        assert "Traceback" not in result.output and "Backed up" not in result.output
    assert not (tmp_path / "target.db").exists()


# --- a history.db that is not one ------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"hello", b"x" * 5000, '{"text": "é"}\n'.encode() * 400, bytes(8192)],
    ids=["short", "text", "utf8-text", "zeroes"],
)
def test_garbage_we_can_tell_is_said_to_be_no_database(tmp_path: Path, content: bytes):
    db = tmp_path / "history.db"
    db.write_bytes(content)
    assert file_kind(db) == "not_a_database"
    with pytest.raises(PassphraseError) as err:
        HistoryStore(db, DIM)
    assert err.value.reason == "not_a_database"
    assert "is not a database" in str(err.value) and "is encrypted" not in str(err.value)
    if "sqlcipher3" in sys.modules or _has_sqlcipher():
        with pytest.raises(PassphraseError) as err:
            HistoryStore(db, DIM, passphrase=PASS)
        assert err.value.reason == "not_a_database"
    assert db.read_bytes() == content


def test_random_bytes_are_encrypted_or_damaged_and_said_so(tmp_path: Path):
    db = tmp_path / "history.db"
    content = np.random.default_rng(0).bytes(8192)
    db.write_bytes(content)
    assert file_kind(db) == "encrypted_or_damaged"
    with pytest.raises(PassphraseError) as err:
        HistoryStore(db, DIM)
    assert err.value.reason == "missing"
    assert "is encrypted or is not an edge-pllm database (damaged?)" in str(err.value)
    assert db.read_bytes() == content


def test_an_encrypted_database_is_still_told_apart(tmp_path: Path):
    pytest.importorskip("sqlcipher3")
    db = tmp_path / "history.db"
    with HistoryStore(db, DIM, passphrase=PASS) as store:
        store.add("alice", ["x"], unit(1))
    assert file_kind(db) == "encrypted_or_damaged"
    with pytest.raises(PassphraseError) as err:
        HistoryStore(db, DIM)
    assert err.value.reason == "missing"
    plain = tmp_path / "plain.db"
    HistoryStore(plain, DIM).close()
    assert file_kind(plain) == "sqlite"
    assert file_kind(tmp_path / "absent.db") == "new"


@pytest.mark.parametrize("damage", ["first page", "no settings"])
def test_a_damaged_sqlite_file_is_called_damaged(tmp_path: Path, damage: str):
    db = tmp_path / "history.db"
    with HistoryStore(db, DIM) as store:
        store.add("alice", ["x"], unit(1))
    if damage == "first page":
        data = bytearray(db.read_bytes())
        data[100:3000] = b"\x07" * 2900  # SQLite's header kept, the schema page gone
        db.write_bytes(bytes(data))
    else:
        conn = sqlite3.connect(db)  # what a half-written or foreign file may lack
        conn.execute("DELETE FROM meta")
        conn.commit()
        conn.close()
    assert file_kind(db) == "sqlite"
    with pytest.raises(PassphraseError) as err:
        HistoryStore(db, DIM)
    assert err.value.reason == "damaged" and "damaged SQLite database" in str(err.value)


def test_the_cli_on_a_garbage_database_is_one_sentence(default_bundle: Path, isolated_home):
    paths.home()
    (isolated_home / "history.db").write_text("this is not a database\n" * 100)
    result = CliRunner().invoke(cli, ["--bundle", str(default_bundle), "users"])
    assert result.exit_code != 0 and "is not a database" in result.output, result.output
    assert "Traceback" not in result.output and "is encrypted" not in result.output


def _has_sqlcipher() -> bool:
    try:
        import sqlcipher3  # noqa: F401
    except ImportError:
        return False
    return True
