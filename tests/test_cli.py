"""The `edge-pllm` CLI end to end on a temporary home, through click's runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_pllm.cli import cli
from edge_pllm.storage import db
from edge_pllm.storage.items import MAX_ITEM_CHARS


@pytest.fixture
def run(default_bundle: Path, isolated_home: Path):
    runner = CliRunner()

    def invoke(*args: str, input: str | bytes | None = None, ok: bool = True):
        result = runner.invoke(
            cli, ["--bundle", str(default_bundle), "--n-ctx", "1024", *args], input=input
        )
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return invoke


def test_add_list_search_ask_export_import_forget(run, tmp_path: Path):
    assert "Added 2 items" in run("add", "alice", "fix: typo in docs", "feat: add json flag").output
    assert "Added 1 item " in run("add", "alice", "-", input="refactor: split the store\n").output
    jsonl = tmp_path / "h.jsonl"
    jsonl.write_text(
        json.dumps({"text": "perf: cache vectors", "created_at": "2024-02-01"})
        + "\n\n"
        + json.dumps("chore: bump deps")
        + "\n"
    )
    assert "Added 2 items" in run("add", "alice", "-f", str(jsonl), "--jsonl").output
    assert "0 already stored" not in run("add", "alice", "fix: typo in docs").output

    users = run("users").output
    assert users.startswith("alice\t5 items")
    listed = [json.loads(line) for line in run("items", "alice", "--json").output.splitlines()]
    assert len(listed) == 5 and {"id", "text", "kind", "created_at", "metadata"} <= set(listed[0])
    assert "refactor: split the store" in [i["text"] for i in listed]  # no trailing newline
    hits = run("search", "alice", "caching vectors", "-k", "1").output
    assert "perf: cache vectors" in hits

    answer = run("ask", "alice", "Write a commit subject for: fixed a typo.", "-n", "12").output
    assert answer.strip()
    shown = run("ask", "alice", "json flag", "-s", "recent:2", "-n", "4", "--show-context").output
    assert "[context #" in shown

    exported = tmp_path / "alice.jsonl"
    run("dump", "alice", "-o", str(exported))
    assert len(exported.read_text().splitlines()) == 5
    assert "Added 5 items" in run("load", "alice2", str(exported)).output
    assert sorted(i["text"] for i in map(json.loads, exported.read_text().splitlines())) == sorted(
        i["text"] for i in listed
    )

    first_id = str(listed[0]["id"])
    assert "Deleted 1 item." in run("delete", "alice", first_id).output
    assert "Forgot alice: 4 items erased" in run("forget", "alice", "--yes").output
    assert "alice\t" not in run("users").output
    status = run("status").output
    assert "items:     5 (vectors 5, integrity ok)" in status


def test_ingest_lamp_profiles_one_user_per_question(run, tmp_path: Path):
    questions = [
        {
            "id": "q1",
            "input": "x",
            "profile": [{"title": "T1", "text": "body one", "date": "2020-01-01"}],
        },
        {
            "id": "q2",
            "input": "y",
            "profile": [{"title": "T2", "text": "body two"}, {"text": "b3"}],
        },
    ]
    path = tmp_path / "dev_questions.json"
    path.write_text(json.dumps(questions))
    run("ingest", str(path), "--user-prefix", "lamp-", "--task", "LaMP_4")
    users = run("users").output
    assert "lamp-q1\t1 item\t" in users and "lamp-q2\t2 items" in users
    (item,) = [json.loads(line) for line in run("items", "lamp-q1", "--json").output.splitlines()]
    assert item["text"] == "T1\n\nbody one" and item["metadata"]["title"] == "T1"
    assert item["created_at"] == "2020-01-01T00:00:00+00:00"
    assert "Unknown task" in run("ingest", str(path), ok=False).output


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (("add", "alice", "   "), None, "empty or holds nothing visible"),
        (("add", "alice", "-"), b"\xff\xfe\xfd", "not valid UTF-8"),
        (("ask", "alice\x1f", "hi"), None, "begins or ends with"),
        (("add", " alice", "x"), None, "begins or ends with a space"),
        (("ask", "alice", "hi", "-s", "telepathy"), None, "Unknown strategy 'telepathy'"),
        (("forget", "nobody", "--yes"), None, "No user named 'nobody'"),
        (("add", "alice"), None, "Give at least one TEXT"),
        (("delete", "alice", "999999"), None, "No history item with id 999999"),
    ],
)
def test_errors_are_one_plain_sentence(run, args, stdin, message):
    run("add", "alice", "seed item")
    result = run(*args, input=stdin, ok=False)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert run("users").output.startswith("alice\t1 item\t")


def test_a_long_note_is_one_item_found_by_its_end(run, tmp_path: Path):
    note = tmp_path / "note.txt"
    shed = [f"Tool {i} hangs in the shed by the rakes." for i in range(40)]
    note.write_text("\n\n".join([*shed, "The spare house key is under the blue flower pot."]))
    assert "Added 1 item " in run("add", "alice", "-f", str(note)).output
    hit = run("search", "alice", "spare house key", "-k", "1").output
    assert "The spare house key is under" in hit and "(part " in hit
    assert "of them for parts of long items" in run("status").output


def test_importing_a_file_of_many_texts_shows_them_as_they_are_embedded(run, tmp_path: Path):
    notes = tmp_path / "notes"
    notes.mkdir()
    days = (f"Day {i}: rain, then sun. " * 8 for i in range(200))  # about 100 parts
    (notes / "diary.md").write_text("\n\n".join(days))
    result = run("import", "bea", str(notes))
    assert "Imported 1 file for bea: 1 item added" in result.output
    assert "diary.md" in result.stderr  # the second bar: the file's texts


def test_reindex_gives_long_items_from_before_parts_theirs(run, isolated_home: Path):
    shed = [f"Tool {i} hangs in the shed by the rakes." for i in range(40)]
    run("add", "alice", "\n\n".join([*shed, "The spare house key is under the blue pot."]))
    conn = db.connect(isolated_home / "history.db")  # as a release before parts left it
    conn.execute("DELETE FROM history_vec WHERE rowid < 0")
    conn.execute("DELETE FROM item_parts")
    conn.commit()
    conn.close()
    assert "(part " not in run("search", "alice", "spare house key", "-k", "1").output
    assert "alice: 1 long item given parts." in run("reindex").output
    assert "(part " in run("search", "alice", "spare house key", "-k", "1").output
    assert "alice: 0 long items given parts." in run("reindex", "alice").output


def test_an_empty_value_is_a_usage_error_that_says_what_to_do(run):
    required = run("search", "alice", "", ok=False).output
    assert "an empty value; give one." in required and "leave it out" not in required
    assert "give one, or leave it out." in run("ask", "alice", "hi", "-s", "", ok=False).output


def test_big_item_is_refused(run, tmp_path: Path):
    big = tmp_path / "big.txt"
    big.write_text("x" * (MAX_ITEM_CHARS + 1))
    result = run("add", "alice", "-f", str(big), ok=False)
    assert "over the limit" in result.output and "split it" in result.output


def test_backup_and_path(run, isolated_home: Path, tmp_path: Path):
    run("add", "alice", "something")
    assert run("path").output.strip() == str(isolated_home)
    dest = tmp_path / "copy.db"
    assert "Backed up" in run("backup", str(dest)).output
    assert dest.stat().st_size > 0
    assert "already exists" in run("backup", str(dest), ok=False).output


def test_one_line_answers_stop_at_the_end_of_their_first_line():
    from edge_pllm.personalization.prompts import first_line

    consumed = []

    def stream(pieces):
        for p in pieces:
            consumed.append(p)
            yield p

    assert "".join(first_line(stream(["\n", " fix: x", "y\n", "second line"]))) == "fix: xy"
    assert consumed == ["\n", " fix: x", "y\n"]  # the generation stopped there
    assert "".join(first_line(iter(["one", " line"]))) == "one line"
    assert "".join(first_line(iter(["a\nb"]))) == "a"
    assert "".join(first_line(iter(["The subject is:\n", "BUG: fix\nmore"]))) == "BUG: fix"
    assert "".join(first_line(iter([]))) == ""
    from edge_pllm.tasks.lamp import task_spec

    clean = task_spec("commit_subject").clean
    assert "".join(first_line(iter(["<text>\n", "BUG: fix\n"]), clean)) == "BUG: fix"


def test_python_dash_m_runs_the_same_cli(isolated_home: Path):
    """`python -m edge_pllm` is the `edge-pllm` command (one module load, plugins included)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "edge_pllm", "path"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(isolated_home)
