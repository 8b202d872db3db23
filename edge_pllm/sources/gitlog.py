"""A person's commits from a git repository, read as the commit-subject task reads them.

One reader serves the device (`edge-pllm import USER --git REPO`: a person's own commits
become their history) and the workstation (`edge-pllm corpus`: many repositories' authors
become a LaMP-format task split by repository), so a history on the device holds exactly
what the head was trained on. The rules are `../shared/data/commit_subjects/README.md`'s:
no merges, mailmap-canonical author emails, no bots, trailers stripped, bodies of at least
12 words cut to 1,200 characters, exact duplicates collapsed (the earliest kept).

Only `git` itself is needed (it reads bare repositories and snapshots too).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from ..errors import GitError
from ..storage.items import NewItem

COMMIT_KIND = "commit"
MIN_BODY_WORDS = 12
MAX_BODY_CHARS = 1200

_BOT = re.compile(
    r"\[bot\]|-bot\b|\bbot@|\bbot\b|dependabot|renovate|github-actions|copilot", re.IGNORECASE
)
# A reference trailer's value: a URL, an issue (#12, gh-12), a commit hash (perhaps with its
# subject), a tracker key (PROJ-12: capitals only, so "x86-64" and "utf-8" are not keys).
_REF_VALUE = (
    r"(?:https?://\S+|<https?://\S+>|[\w./-]*#\d+|gh-\d+|(?-i:[0-9a-f]{7,40})\b.*"
    r"|(?-i:[A-Z][A-Z0-9]+-\d+))"
)
_TRAILER = re.compile(
    "|".join(
        (
            r"[A-Za-z][\w-]*-by:.*",  # Signed-off-by, Co-authored-by, Reviewed-by, ...
            r"(?:Cc|Change-Id|Thanks-to):.*",
            rf"(?:Bug|Bugs|Ref|Refs|Link|Fixes|Fixed|Closes|Closed|See|See-also|URL):\s*"
            rf"{_REF_VALUE}(?:[\s,]+{_REF_VALUE})*\s*",
            rf"(?:Closes|Closed|Fixes|Fixed|Fix|Resolves|Resolved|See|Ref|Refs)\s+"
            rf"{_REF_VALUE}(?:[\s,]+(?:and\s+)?{_REF_VALUE})*\.?",
            r"\(cherry picked from commit [0-9a-f]+\)",
            r"\[(?:skip|ci skip|no ci|skip ci)[^\]]*\]",
        )
    ),
    re.IGNORECASE,
)
_SVN_ID = re.compile(r"git-svn-id:.*")
_SQUASH_RULE = re.compile(r"-{3,}")


@dataclass(frozen=True)
class Commit:
    """One qualifying commit: who wrote it (mailmap-canonical), when (UTC), and what."""

    sha: str
    email: str  # lowercased
    name: str
    time: datetime  # author date, UTC
    subject: str
    body: str

    @property
    def date(self) -> str:
        """The author date as the task files write it (UTC calendar day)."""
        return self.time.strftime("%Y-%m-%d")

    def profile_entry(self, entry_id: str) -> dict[str, Any]:
        """The commit as a commit-subject profile entry (title = subject, text = body)."""
        return {"id": entry_id, "title": self.subject, "text": self.body, "date": self.date}


def is_bot(email: str, name: str) -> bool:
    """Whether an author is a bot by the task's rule (a word match: "Talbot" is a person)."""
    return bool(_BOT.search(email) or _BOT.search(name))


def clean_body(body: str) -> str:
    """`body` without trailer lines, squash rulers and surrounding blank space."""
    kept = []
    for line in body.splitlines():
        stripped = line.strip()
        if _TRAILER.fullmatch(stripped) or _SVN_ID.fullmatch(line):
            continue
        kept.append(line.rstrip())
    while kept and (not kept[-1].strip() or _SQUASH_RULE.fullmatch(kept[-1].strip())):
        kept.pop()
    # A trailer removed between two paragraphs leaves one blank line, not two.
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()


def parse_message(message: str) -> tuple[str, str] | None:
    """(subject, cleaned body) of a raw commit message, or None when it does not qualify: a
    second line that is not blank, or a body under `MIN_BODY_WORDS` words once cleaned."""
    lines = message.strip("\n").split("\n")
    if len(lines) < 3 or lines[1].strip():
        return None
    subject = lines[0].strip()
    body = clean_body("\n".join(lines[2:]))
    if not subject or len(body.split()) < MIN_BODY_WORDS:
        return None
    return subject, body[:MAX_BODY_CHARS].strip()


def _git(repo: Path, *args: str) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """git run on `repo` itself, never on a repository above it (a folder inside someone's
    dotfiles repository is not that repository), and the file its errors go to (a file,
    not a pipe: a long error output cannot stall the log being read)."""
    git = shutil.which("git")
    if git is None:
        raise GitError("Reading a repository needs git; install git and try again.", repo=str(repo))
    if not repo.is_dir():
        raise GitError(
            f"{repo} is not a folder; give the path of a git repository.", repo=str(repo)
        )
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    env["GIT_CEILING_DIRECTORIES"] = str(repo.resolve().parent)
    errors = tempfile.TemporaryFile()  # noqa: SIM115  (the caller closes it)
    command = [git, "-C", str(repo), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, env=env), errors


def _failure(errors: IO[bytes]) -> str:
    """The last line git wrote to its error output, once it has ended."""
    errors.seek(0)
    lines = errors.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(no message)"


def head_commit(repo: str | Path, rev: str = "HEAD") -> str:
    """The full hash `rev` names in `repo`."""
    proc, errors = _git(
        Path(repo), "rev-parse", "--verify", "--end-of-options", f"{rev}^{{commit}}"
    )
    with errors:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            why = _failure(errors)
            raise GitError(f"{repo} is not a git repository with {rev}: {why}", repo=str(repo))
    return out.decode().strip()


def _raw_commits(repo: Path, commit: str) -> Iterator[tuple[str, str, str, int, str]]:
    # NUL ends each commit (-z); unit separators split its fields. The message is last, so
    # it may hold any text. The mailmap is the one of the commit read (a bare clone's would
    # be HEAD's), so a clone made later gives the same authors.
    fmt = "%H%x1f%aE%x1f%aN%x1f%at%x1f%B"
    args = ["log", "--no-merges", "--use-mailmap", "-z", f"--format={fmt}", commit, "--"]
    proc, errors = _git(repo, "-c", f"mailmap.blob={commit}:.mailmap", *args)
    assert proc.stdout is not None
    pending = b""
    with errors:
        try:
            while chunk := proc.stdout.read(1 << 20):
                pending += chunk
                *records, pending = pending.split(b"\0")
                for record in records:
                    fields = record.decode("utf-8", "replace").split("\x1f", 4)
                    sha, email, name, stamp, message = fields
                    yield sha, email, name, int(stamp), message
        finally:
            if proc.poll() is None:  # left before the end: git is stopped, not left behind
                proc.kill()
            proc.wait()
        if proc.returncode != 0:
            why = _failure(errors)
            raise GitError(f"git could not read the log of {repo}: {why}", repo=str(repo))


def read_commits(
    repo: str | Path, *, authors: Collection[str] | None = None, rev: str = "HEAD"
) -> list[Commit]:
    """The qualifying commits of `repo` up to `rev`, oldest first (by author date, then as
    git lists them), each author's exact duplicates collapsed to the earliest. `authors`
    keeps only those emails (compared lowercased, after the repository's mailmap)."""
    repo = Path(repo)
    commit = head_commit(repo, rev)  # a clear error before the log is read
    wanted = None if authors is None else {a.strip().lower() for a in authors}
    commits: list[Commit] = []
    for sha, email, name, stamp, message in _raw_commits(repo, commit):
        email = email.strip().lower()
        if wanted is not None and email not in wanted:
            continue
        if is_bot(email, name):
            continue
        parsed = parse_message(message)
        if parsed is None:
            continue
        time = datetime.fromtimestamp(stamp, UTC)
        commits.append(Commit(sha, email, name.strip(), time, *parsed))
    commits.reverse()  # git lists newest first; the earliest duplicate is kept below
    commits.sort(key=lambda c: c.time)
    seen: set[tuple[str, str, str]] = set()
    unique = []
    for c in commits:
        key = (c.email, c.subject, c.body)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def configured_email(repo: str | Path) -> str | None:
    """The repository's `user.email` (its own config, else the user's global one)."""
    proc, errors = _git(Path(repo), "config", "--get", "user.email")
    with errors:
        out, _ = proc.communicate()
    email = out.decode(errors="replace").strip().lower()
    return email if proc.returncode == 0 and email else None


def author_counts(commits: Collection[Commit]) -> list[tuple[str, int]]:
    """Each author's qualifying commits, most first."""
    counts: dict[str, int] = {}
    for c in commits:
        counts[c.email] = counts.get(c.email, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def history_items(commits: Collection[Commit], repo: str | Path) -> list[NewItem]:
    """The commits as history items, stored as the commit-subject task stores a profile
    ("subject\n\nbody", the subject also as `title`), each naming its source."""
    from ..tasks.lamp import task_spec  # the task's own rule for what is stored and embedded

    spec = task_spec("commit_subject")
    source = str(Path(repo).resolve())
    return [
        NewItem(
            text=spec.item_text(c.profile_entry(c.sha)),
            kind=COMMIT_KIND,
            created_at=c.time.isoformat(timespec="seconds"),
            metadata={"title": c.subject, "source": {"git": source, "commit": c.sha}},
        )
        for c in commits
    ]


def own_commits(repo: str | Path, authors: Collection[str] = (), rev: str = "HEAD") -> list[Commit]:
    """The qualifying commits of `authors` (default: the repository's `user.email`) in
    `repo`. No author, or one with no commits, is an error that names who has the most."""
    chosen = [a.strip().lower() for a in authors if a.strip()]
    if not chosen and (email := configured_email(repo)):
        chosen = [email]
    everyone = read_commits(repo, rev=rev)
    mine = [c for c in everyone if c.email in chosen]
    if mine:
        return mine
    top = ", ".join(f"{e} ({n})" for e, n in author_counts(everyone)[:3]) or "nobody"
    if not chosen:
        raise GitError(
            f"{repo} sets no user.email, so whose commits are yours is not known: name your "
            f"email with --author EMAIL (the most qualifying commits are by {top}).",
            repo=str(repo),
            field="author",
        )
    raise GitError(
        f"{repo} has no qualifying commits by {', '.join(chosen)} (the most are by {top}): "
        "name your email with --author EMAIL.",
        repo=str(repo),
        field="author",
    )
