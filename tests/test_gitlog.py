"""Commits read from real git repositories made in the test: the task's rules (`gitlog`),
the corpus split by person (`edge-pllm corpus`) and a person's own history (`import --git`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_pllm.cli import cli
from edge_pllm.errors import InvalidInputError
from edge_pllm.sources.gitlog import clean_body, is_bot, own_commits, parse_message, read_commits

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

BODY = "This explains the change in enough words to count as a body for the task here"


class Repo:
    """A git repository made commit by commit, each with its author and day."""

    def __init__(self, path: Path):
        self.path, self.day = path, 0
        self.env = {
            **os.environ,
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_COMMITTER_NAME": "Committer",
            "GIT_COMMITTER_EMAIL": "committer@example.org",
            "GIT_AUTHOR_NAME": "Merger",
            "GIT_AUTHOR_EMAIL": "merger@example.org",
        }
        path.mkdir(parents=True)
        self.git("init", "-q", "-b", "main")

    def git(self, *args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(self.path), *args],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout

    def commit(self, email: str, message: str, *, day: int | None = None) -> str:
        """A commit by `email` on day `day` (default: the day after the last one)."""
        self.day = self.day + 1 if day is None else day
        stamp = (datetime(2024, 1, 1, 12, tzinfo=UTC) + timedelta(days=self.day)).isoformat()
        (self.path / "f.txt").write_text(f"{self.day} {message}\n", encoding="utf-8")
        self.git("add", "f.txt")
        self.env.update({"GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp})
        self.git("commit", "-q", "--author", f"{email.split('@')[0]} <{email}>", "-m", message)
        return self.git("rev-parse", "HEAD").strip()


def test_messages_follow_the_task_rules():
    assert parse_message(f"fix: a subject\n\n{BODY}") == ("fix: a subject", BODY)
    assert parse_message(f"fix: a subject\ncontinued here\n\n{BODY}") is None  # 2nd line
    assert parse_message("fix: short\n\nonly a few words here") is None  # under 12 words
    body = (
        f"{BODY}\n\nSigned-off-by: A Person <a@example.org>\nCo-authored-by: B <b@x.org>\n"
        "Change-Id: I0123456789abcdef\nFixes: https://example.org/issues/4\nCloses #12\n"
        "(cherry picked from commit 0123456789abcdef)\n[skip ci]\n---------"
    )
    assert clean_body(body) == BODY
    # A trailer between two paragraphs leaves one blank line; text that looks like a
    # trailer inside a sentence stays.
    assert clean_body("one\n\nCc: x@y.org\n\ntwo Fixes: it") == "one\n\ntwo Fixes: it"
    assert parse_message(f"s\n\n{'word ' * 400}")[1] == ("word " * 400)[:1200].strip()


@pytest.mark.parametrize(
    ("email", "name", "bot"),
    [
        ("dependabot[bot]@users.noreply.github.com", "dependabot[bot]", True),
        ("ci@example.org", "release-bot", True),
        ("bot@example.org", "Builder", True),
        ("rtalbot@example.org", "R. Talbot", False),
        ("s@example.org", "Sidebottom", False),
    ],
)
def test_bots_are_matched_as_words(email: str, name: str, bot: bool):
    assert is_bot(email, name) is bot


def test_reader_applies_mailmap_merges_bots_and_duplicates(tmp_path: Path):
    repo = Repo(tmp_path / "r")
    repo.commit("ann@old.org", f"first: by the old address\n\n{BODY}")
    repo.commit("ann@new.org", f"second: by the new address\n\n{BODY} again")
    repo.commit("ann@new.org", f"second: by the new address\n\n{BODY} again")  # a duplicate
    repo.commit("renovate@example.org", f"chore: bump\n\n{BODY}")
    repo.commit("bob@example.org", "short\n\ntoo short")
    repo.git("checkout", "-q", "-b", "side")
    repo.commit("bob@example.org", f"side: work\n\n{BODY}")
    repo.git("checkout", "-q", "main")
    repo.git("merge", "-q", "--no-ff", "-m", f"Merge side\n\n{BODY}", "side")
    (repo.path / ".mailmap").write_text("Ann <ann@new.org> <ann@old.org>\n", encoding="utf-8")
    repo.git("add", ".mailmap")
    repo.commit("ann@new.org", f"mailmap: add one\n\n{BODY} and more")

    commits = read_commits(repo.path)
    assert [(c.email, c.subject) for c in commits] == [
        ("ann@new.org", "first: by the old address"),  # the mailmap's canonical email
        ("ann@new.org", "second: by the new address"),  # once
        ("bob@example.org", "side: work"),  # the merge itself is skipped
        ("ann@new.org", "mailmap: add one"),
    ]
    assert [c.date for c in commits] == ["2024-01-02", "2024-01-03", "2024-01-07", "2024-01-08"]
    # A bare clone reads the same (its mailmap from HEAD).
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo.path), str(bare)], check=True)
    assert read_commits(bare) == commits
    # Read at an earlier commit, the mailmap is that commit's (none yet): a clone made later
    # gives the same authors.
    before = repo.git("rev-parse", "HEAD~1").strip()
    assert {c.email for c in read_commits(bare, rev=before)} == {
        "ann@old.org",
        "ann@new.org",
        "bob@example.org",
    }
    # A folder inside a repository is not that repository.
    (repo.path / "sub").mkdir()
    with pytest.raises(InvalidInputError, match="not a git repository"):
        read_commits(repo.path / "sub")


def _people_repo(path: Path, people: dict[str, int]) -> Repo:
    repo = Repo(path)
    for n in range(max(people.values())):
        for email, count in people.items():
            if n < count:
                repo.commit(email, f"area: change {n} by {email}\n\n{BODY} {n}")
    return repo


def test_corpus_splits_by_repository_and_person(tmp_path: Path):
    from export.corpus import build_corpus, read_repo_list

    snaps = tmp_path / "snaps"
    heads = {}
    layout = {
        "a/train-repo": {"shared@x.org": 14, "t1@x.org": 13, "few@x.org": 3},
        "b/dev-repo": {"d1@x.org": 12, "shared@x.org": 12},
        "c/test-repo": {"e1@x.org": 12, "e2@x.org": 11},
    }
    for name, people in layout.items():
        repo = _people_repo(snaps / name.replace("/", "+"), people)
        heads[name] = repo.git("rev-parse", "HEAD").strip()
    listing = tmp_path / "repos.tsv"
    splits = {"a/train-repo": "train", "b/dev-repo": "dev", "c/test-repo": "test"}
    listing.write_text(
        "# comment\n" + "".join(f"{r}\t{s}\t{heads[r]}\tkind\n" for r, s in splits.items())
    )
    entries = read_repo_list(listing)
    corpus = build_corpus(snaps, tmp_path / "out", entries, min_commits=10, min_profile=2)

    from edge_pllm.tasks.lamp import load_split

    got = {s: load_split(tmp_path / "out", s) for s in ("train", "dev", "test")}
    qs = {s: list(t.questions()) for s, t in got.items()}
    assert [len(qs[s]) for s in ("train", "dev", "test")] == [2, 1, 2]
    dev = {r.repo: r for r in corpus.repos}["b/dev-repo"]
    assert (dev.users, dev.queries, dev.moved_people) == (2, 1, 1)  # shared@ stays in train
    for split, questions in qs.items():
        for q in questions:
            gold = got[split].golds[q.id]
            # train asks for the third-to-last commit, dev and test for the last
            n = int(gold.split()[2])
            email = gold.split()[-1]
            count = next(p[email] for p in layout.values() if email in p)
            assert n == count - (3 if split == "train" else 1)
            assert q.input.endswith(f"{BODY} {n}")
            # the profile: the same person's commits of earlier days only
            assert all(p["title"].endswith(email) for p in q.profile)
            assert [int(p["title"].split()[2]) for p in q.profile] == list(range(n))
            assert [p["date"] for p in q.profile] == sorted(p["date"] for p in q.profile)
    # No person in two splits, and the counts are recorded.
    people = {s: {q.profile[0]["title"].split()[-1] for q in qs[s]} for s in qs}
    assert people["train"] == {"shared@x.org", "t1@x.org"}  # few@ has too few commits
    assert people["dev"] == {"d1@x.org"} and people["test"] == {"e1@x.org", "e2@x.org"}
    manifest = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert manifest["splits"]["test"]["queries"] == manifest["splits"]["test"]["people"] == 2


def test_repo_list_refuses_held_out_and_malformed_entries(tmp_path: Path):
    from edge_pllm.errors import InvalidInputError
    from export.corpus import DEFAULT_REPOS, held_out, read_repo_list

    listing = tmp_path / "repos.tsv"
    # The kept repositories are named in docs/CORPUS.md only (the code holds their hashes).
    corpus_doc = Path(__file__).resolve().parent.parent / "docs" / "CORPUS.md"
    kept: list[str] = []
    if corpus_doc.is_file():
        text = corpus_doc.read_text(encoding="utf-8")
        start = text.index("## Repositories and counts")
        kept = re.findall(r"[\w.-]+/[\w.-]+", text[start : text.index("kept for checks", start)])
        assert len(kept) == 6
    for line, words in [
        *[(f"{name}\ttest\t{'a' * 40}", "kept for checks from outside") for name in kept],
        (f"x/y\ttesting\t{'a' * 40}", "split must be one of"),
        ("x/y\ttest\tHEAD", "not a full commit hash"),
        (f"x/y\ttest\t{'a' * 40}\nz/y\tdev\t{'b' * 40}", "more than one repository"),
    ]:
        listing.write_text(line + "\n")
        with pytest.raises(InvalidInputError, match=words):
            read_repo_list(listing)
    shipped = read_repo_list(DEFAULT_REPOS)
    assert len(shipped) >= 30 and not any(held_out(e.repo) for e in shipped)
    assert all(held_out(name.upper()) for name in kept)
    assert {e.repo for e in shipped if e.split == "train"} >= {"git/git", "numpy/numpy"}


def test_import_git_stores_the_persons_own_commits(
    tmp_path: Path, default_bundle: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)  # no user.email from this machine
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    repo = Repo(tmp_path / "mine")
    repo.commit("me@example.org", f"parser: skip blank lines\n\n{BODY}")
    repo.commit("other@example.org", f"docs: not mine\n\n{BODY}")
    repo.commit("me@example.org", f"cli: add a flag\n\n{BODY} flag")
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli, ["--bundle", str(default_bundle), *args])
        return f"{result.exit_code} {result.output}"

    out = run("import", "me", "--git", str(repo.path))
    assert out.startswith("1 ") and "sets no user.email" in out
    assert "me@example.org (2)" in out and "--author EMAIL" in out
    out = run("import", "me", "--git", str(repo.path), "--author", "nobody@example.org")
    assert "no qualifying commits by nobody@example.org" in out
    assert run("import", "me", "--git", str(repo.path), "--author", "ME@example.org").startswith(
        "0 Added 2 items"
    )
    assert "Added 0 items for me (2 already stored)" in run(
        "import", "me", "--git", str(repo.path), "--author", "me@example.org"
    )
    items = [
        json.loads(line) for line in run("items", "me", "--json").split(" ", 1)[1].splitlines()
    ]
    assert {i["metadata"]["title"] for i in items} == {
        "parser: skip blank lines",
        "cli: add a flag",
    }
    assert all(i["kind"] == "commit" and i["metadata"]["source"]["commit"] for i in items)
    repo.git("config", "user.email", "me@example.org")
    assert own_commits(repo.path)[0].subject == "parser: skip blank lines"
    assert "does not exist" in run("import", "me", "--git", str(tmp_path / "nope"))
    assert "not a git repository" in run("import", "me", "--git", str(tmp_path))
