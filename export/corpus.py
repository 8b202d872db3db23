"""A commit-subject corpus split by person: many repositories' authors as a LaMP-format task
whose train, dev and test splits hold different repositories and different people.

The shared task (`../shared/data/commit_subjects`) is a time split of 207 people: its test
measures people the head trained on. Here every split's people are new to the others: a
repository belongs to one split, and a person (mailmap-canonical email) who is a user in
repositories of two splits is kept only in the first of train, dev, test. The rules for
commits and users are the shared task's (`edge_pllm.sources.gitlog`); queries are:

- dev and test: each user's last qualifying commit;
- train: each user's third-to-last (as the shared task's train query), so a shared
  repository's dev and test queries (the last two) are never trained on; `train-plug` also
  trains on the most recent profile items of each question.

A query's profile is the user's commits from days strictly before the query's (no future
leakage), the `max_profile` most recent, oldest first. The list of repositories, their
splits and the commits read (`export/corpus_repos.tsv`) make the corpus reproducible from
any clone that holds those commits.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_pllm.errors import InvalidInputError
from edge_pllm.files import atomic_write, private_dir
from edge_pllm.sources.gitlog import Commit, head_commit, read_commits
from edge_pllm.tasks.lamp import write_split

SPLITS = ("train", "dev", "test")
DEFAULT_REPOS = Path(__file__).with_name("corpus_repos.tsv")
# Kept for checks from outside the project, never in any split (docs/CORPUS.md names them):
# the first 16 hex digits of the sha256 of each lowercased owner/name.
HELD_OUT = frozenset(
    {
        "4a6a2f7a12cba371",
        "52af441eec492216",
        "767b50c75dcf7b0a",
        "9d238bdf0f0bcb55",
        "ae792465b4e8ff03",
        "bf451cb853450614",
    }
)
INPUT_PREFIX = "Generate a subject line for the following commit message: "
# Which of a user's qualifying commits (from the end) is the split's query.
QUERY_FROM_END = {"train": 3, "dev": 1, "test": 1}


@dataclass(frozen=True)
class RepoEntry:
    """One line of the repository list: which repository, its split, the commit read."""

    repo: str  # owner/name
    split: str
    head: str  # the commit read (full hash)
    kind: str = ""  # what it is (documentation only)

    @property
    def tag(self) -> str:
        """The short name ids start with (the repository's name, lowercased)."""
        return re.sub(r"[^a-z0-9]+", "-", self.repo.split("/", 1)[1].lower()).strip("-")


@dataclass
class RepoCounts:
    repo: str
    split: str
    head: str
    kind: str
    qualifying: int = 0
    users: int = 0
    queries: int = 0
    moved_people: int = 0  # users here who are users in an earlier split's repository
    short_profiles: int = 0  # users whose query has fewer than `min_profile` earlier items


@dataclass
class Corpus:
    """What `build_corpus` wrote: the counts, per repository and per split."""

    out: Path
    repos: list[RepoCounts] = field(default_factory=list)
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        return {
            "task": "commit_subject",
            "settings": self.settings,
            "splits": self.splits,
            "repos": [asdict(r) for r in self.repos],
        }


def read_repo_list(path: str | Path = DEFAULT_REPOS) -> list[RepoEntry]:
    """The repository list: tab-separated `repo split head [kind]` lines ('#' comments)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidInputError(
            f"Cannot read the repository list {path}: {exc.strerror}."
        ) from None
    entries: list[RepoEntry] = []
    rows = csv.reader((ln for ln in lines if ln.strip() and not ln.startswith("#")), delimiter="\t")
    for n, row in enumerate(rows, 1):
        if len(row) < 3:
            raise InvalidInputError(
                f"{path}, entry {n}: expected 'owner/name<TAB>split<TAB>commit', got {row!r}."
            )
        repo, split, head = (c.strip() for c in row[:3])
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
            raise InvalidInputError(f"{path}, entry {n}: {repo!r} is not owner/name.")
        if held_out(repo):
            raise InvalidInputError(
                f"{path}: {repo} is kept for checks from outside the project; remove it."
            )
        if split not in SPLITS:
            raise InvalidInputError(f"{path}, {repo}: the split must be one of {SPLITS}.")
        if not re.fullmatch(r"[0-9a-f]{40}", head):
            raise InvalidInputError(f"{path}, {repo}: {head!r} is not a full commit hash.")
        entries.append(RepoEntry(repo, split, head, row[3].strip() if len(row) > 3 else ""))
    twice = sorted(t for t, k in Counter(e.tag for e in entries).items() if k > 1)
    if twice:
        raise InvalidInputError(
            f"{path}: more than one repository is named {', '.join(twice)}; list each once."
        )
    return entries


def held_out(repo: str) -> bool:
    """Whether `repo` (owner/name) is kept for checks from outside the project."""
    return hashlib.sha256(repo.lower().encode()).hexdigest()[:16] in HELD_OUT


def find_snapshot(snapshots: Path, repo: str) -> Path:
    """The git directory of `repo` under `snapshots`: `owner+name/repo` (as the project's
    mirror tool lays them out), `owner+name`, `owner/name`, `name.git` or `name`."""
    owner, name = repo.split("/", 1)
    for candidate in (
        snapshots / f"{owner}+{name}" / "repo",
        snapshots / f"{owner}+{name}",
        snapshots / owner / name,
        snapshots / f"{name}.git",
        snapshots / name,
    ):
        if candidate.is_dir():
            return candidate
    raise InvalidInputError(
        f"No snapshot of {repo} in {snapshots}: clone it there "
        f"(git clone --bare <its URL> {snapshots / (owner + '+' + name)})."
    )


def _order(email: str) -> str:
    # Users in a stable order that says nothing about them (not alphabetical by email).
    return hashlib.sha256(email.encode()).hexdigest()


def build_corpus(
    snapshots: str | Path,
    out: str | Path,
    entries: Sequence[RepoEntry],
    *,
    min_commits: int = 30,
    min_profile: int = 10,
    max_profile: int = 300,
    progress: Callable[[str], None] | None = None,
) -> Corpus:
    """Read every listed repository at its commit and write the task folder `out`:
    `{train,dev,test}_questions.json`, `{split}_outputs.json` and `corpus.json` (the
    settings and counts)."""
    snapshots = Path(snapshots)
    least = max(QUERY_FROM_END.values()) + min_profile
    if min_commits < least or min_profile > max_profile:
        raise InvalidInputError(
            f"min_commits must be at least {least} (the query and min_profile earlier "
            "commits), and min_profile at most max_profile."
        )
    paths = [find_snapshot(snapshots, e.repo) for e in entries]  # all found before any work
    by_repo: dict[str, dict[str, list[Commit]]] = {}
    counts: dict[str, RepoCounts] = {}
    for entry, path in zip(entries, paths, strict=True):
        found = head_commit(path, entry.head)
        if found != entry.head:
            raise InvalidInputError(f"{entry.repo}: {entry.head} resolves to {found}.")
        grouped: dict[str, list[Commit]] = defaultdict(list)
        for c in read_commits(path, rev=entry.head):
            grouped[c.email].append(c)
        by_repo[entry.repo] = grouped
        counts[entry.repo] = RepoCounts(entry.repo, entry.split, entry.head, entry.kind)
        counts[entry.repo].qualifying = sum(len(v) for v in grouped.values())
        if progress:
            progress(entry.repo)

    # A person belongs to the first split (train, dev, test) where they are a user.
    home: dict[str, int] = {}
    for entry in entries:
        for email, commits in by_repo[entry.repo].items():
            if len(commits) >= min_commits:
                rank = SPLITS.index(entry.split)
                home[email] = min(rank, home.get(email, rank))

    questions: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    people: dict[str, set[str]] = {s: set() for s in SPLITS}  # a user of two repos is one
    golds: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for entry in entries:
        row, grouped = counts[entry.repo], by_repo[entry.repo]
        # One id per commit, the same in every profile that holds it.
        ordered = sorted((c for v in grouped.values() for c in v), key=lambda c: (c.time, c.sha))
        ids = {c.sha: f"{entry.tag}-c{k}" for k, c in enumerate(ordered)}
        users = sorted((e for e, v in grouped.items() if len(v) >= min_commits), key=_order)
        row.users = len(users)
        for email in users:
            if home[email] != SPLITS.index(entry.split):
                row.moved_people += 1
                continue
            commits = grouped[email]
            query = commits[-QUERY_FROM_END[entry.split]]
            profile = [c for c in commits if c.date < query.date][-max_profile:]
            if len(profile) < min_profile:
                row.short_profiles += 1
                continue
            qid = f"{entry.tag}-{row.queries}"
            row.queries += 1
            people[entry.split].add(email)
            questions[entry.split].append(
                {
                    "id": qid,
                    "input": INPUT_PREFIX + query.body,
                    "profile": [c.profile_entry(ids[c.sha]) for c in profile],
                }
            )
            golds[entry.split].append({"id": qid, "output": query.subject})

    out = private_dir(out)
    corpus = Corpus(
        out,
        list(counts.values()),
        settings={
            "min_commits": min_commits,
            "min_profile": min_profile,
            "max_profile": max_profile,
            "query_from_end": QUERY_FROM_END,
        },
    )
    for split in SPLITS:
        if not questions[split]:  # no split left over from an earlier build
            for name in (f"{split}_questions.json", f"{split}_outputs.json"):
                (out / name).unlink(missing_ok=True)
            continue
        write_split(out, split, "commit_subject", questions[split], golds[split])
        sizes = [len(q["profile"]) for q in questions[split]]
        corpus.splits[split] = {
            "repos": sum(1 for r in corpus.repos if r.split == split),
            "queries": len(sizes),
            "people": len(people[split]),
            "profile_mean": round(statistics.fmean(sizes), 1),
            "profile_median": float(statistics.median(sizes)),
        }
    atomic_write(out / "corpus.json", json.dumps(corpus.manifest(), indent=1) + "\n")
    return corpus


def corpus_report(corpus: Corpus, command: str) -> str:
    """The corpus's counts as Markdown: what docs/CORPUS.md holds."""
    lines = [
        "| repository | kind | split | commit read | qualifying commits | users | queries "
        "| moved to an earlier split | profile too short |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in corpus.repos:
        lines.append(
            f"| {r.repo} | {r.kind} | {r.split} | `{r.head[:12]}` | {r.qualifying:,} | {r.users} "
            f"| {r.queries} | {r.moved_people} | {r.short_profiles} |"
        )
    lines += ["", "| split | repositories | queries (users) | people | mean profile | median |"]
    lines.append("|---|---|---|---|---|---|")
    for split, s in corpus.splits.items():
        lines.append(
            f"| {split} | {s['repos']} | {s['queries']} | {s['people']} | {s['profile_mean']} "
            f"| {s['profile_median']:g} |"
        )
    people = sum(s["people"] for s in corpus.splits.values())
    users = sum(s["queries"] for s in corpus.splits.values())
    head = (
        f"Built by `{command}`: {users} users, {people} people (a person who is a user in two "
        "repositories of one split is two users)."
    )
    return "\n".join([head, "", *lines, ""])
