"""Private files and folders, and replacing a file in one step.

Owner-only: every folder edge-pllm creates is 0o700 and every file 0o600, whatever the
umask (the mode is set again after creation, since the umask may have removed bits). On
POSIX that keeps other local accounts out; Windows has no such modes (os.chmod there
only sets the read-only flag), and the folders inherit the ACLs of the user's profile.
Files made before this rule (a home of an earlier release) are tightened when opened,
with a warning (`tighten`).

Replacing in one step: a reader sees the old content or the new, never half. The new
content is written to a temporary file in the same folder (so the final rename stays on
one file system), flushed to disk, then renamed over the destination with `os.replace`,
which is atomic on POSIX and Windows. On failure the temporary file is removed and the
destination is left as it was.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import InvalidInputError

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # not on Windows: links are checked by name there
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)


def _set_mode(path: str | Path, mode: int) -> None:
    if os.name == "posix":
        os.chmod(path, mode)


def private_dir(path: str | Path) -> Path:
    """Create the folder `path` and any missing parent, each owner-only (0o700); a folder
    that already exists is left as it is. Returns `path`. Like `Path.mkdir(parents=True,
    exist_ok=True)`: FileExistsError if something other than a folder is there."""
    path = Path(path)
    missing = []
    at = path
    while not at.is_dir() and at.parent != at:
        missing.append(at)
        at = at.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, PRIVATE_DIR)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # made by another process meanwhile: not ours to change
        _set_mode(folder, PRIVATE_DIR)
    return path


def create_private(path: str | Path) -> int:
    """Create `path` as a new, empty owner-only (0o600) file and return a descriptor open
    for writing. FileExistsError if anything is there: a file, a folder or a symbolic link,
    even a dangling one (never followed)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY
    fd = os.open(path, flags, PRIVATE_FILE)
    try:
        fchmod = getattr(os, "fchmod", None)
        if fchmod is not None and os.name == "posix":
            fchmod(fd, PRIVATE_FILE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_file(path: str | Path, also: Sequence[str | Path] = ()) -> bool:
    """Make sure the file `path` is owner-only before a library (SQLite) opens it: created
    empty and 0o600 if missing (True), tightened if it is there already (False), and so are
    the existing files in `also` (SQLite gives the -wal, -shm and -journal files it creates
    the database file's mode; those of an earlier release may be readable)."""
    try:
        os.close(create_private(path))
    except FileExistsError:
        tighten(path, *also)
        return False
    tighten(*also)
    return True


def _uid() -> int | None:
    geteuid = getattr(os, "geteuid", None)
    return geteuid() if geteuid is not None else None


def tighten(*paths: str | Path) -> list[str]:
    """Take the group's and others' permissions away from each existing file or folder in
    `paths` that belongs to this account (0o644 becomes 0o600, 0o755 0o700), and say so in
    one warning. Returns those changed. Anything else (missing, another account's, neither
    file nor folder, any path on Windows) is left alone."""
    uid = _uid()
    changed: list[tuple[str, int]] = []
    stuck: list[tuple[str, int]] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        kind = stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
        if uid is None or st.st_uid != uid or not kind or not mode & 0o077:
            continue
        try:
            os.chmod(path, mode & 0o700)
        except OSError:  # a file system without modes (FAT, some network shares)
            stuck.append((str(path), mode))
            continue
        changed.append((str(path), mode))
    if changed:
        listed = ", ".join(f"{p} (mode {m:o} to {m & 0o700:o})" for p, m in changed)
        warnings.warn(
            f"Made owner-only what was open to other accounts: {listed}.",
            UserWarning,
            stacklevel=2,
        )
    if stuck:
        listed = ", ".join(f"{p} (mode {m:o})" for p, m in stuck)
        warnings.warn(
            f"Open to other accounts, and the file system keeps its mode: {listed}; keep "
            "the edge-pllm home on a disk with POSIX permissions.",
            UserWarning,
            stacklevel=2,
        )
    return [p for p, _ in changed]


def _refusal(path: Path, exc: OSError, field: str) -> InvalidInputError:
    """One sentence for a destination that cannot be created."""
    if path.is_symlink():
        text = f"{path} is a symbolic link, which is never followed; choose a new file name."
    elif isinstance(exc, IsADirectoryError) or path.is_dir():
        text = f"{path} is a folder; give a file name."
    elif isinstance(exc, FileExistsError):
        text = f"{path} already exists; choose a new file name."
    elif isinstance(exc, FileNotFoundError) and not path.parent.exists():
        text = f"The folder {path.parent} does not exist; create it first."
    elif isinstance(exc, NotADirectoryError):
        text = f"{path.parent} is not a folder."
    elif exc.errno == errno.ELOOP:
        text = f"{path.parent} has a loop of symbolic links."
    elif isinstance(exc, PermissionError):
        text = f"Cannot write {path}: permission denied."
    else:
        text = f"Cannot write {path}: {exc.strerror or exc}."
    return InvalidInputError(text, field=field)


def destination(path: str | Path) -> Path:
    """`path` as an absolute path whose folder is resolved, so that no library can read it
    as a URI (SQLite takes `file:...` for one) and no link in the folder changes later; the
    last part is kept as given (a link there is refused by the creators below)."""
    path = Path(path)
    return Path(os.path.realpath(path.parent)) / path.name


def new_private_file(path: str | Path, *, field: str = "path") -> Path:
    """Create `path` (see `destination`) as a new, empty owner-only file for a copy to be
    written into, and return its absolute path. A name already taken (a file, a folder, a
    link even dangling), a missing or unwritable folder: InvalidInputError, in one
    sentence."""
    if Path(path).name in ("", ".", ".."):
        raise InvalidInputError(f"{path} is a folder; give a file name.", field=field)
    dest = destination(path)
    try:
        os.close(create_private(dest))
    except OSError as exc:
        raise _refusal(dest, exc, field) from None
    return dest


def copy_private(src: str | Path, dst: str | Path) -> Path:
    """Copy the file `src` to the new file `dst`, owner-only (0o600) from its creation
    (`shutil.copyfile` gives the copy the umask's mode). Returns `dst`."""
    fd = create_private(dst)
    try:
        with open(src, "rb") as source, os.fdopen(fd, "wb") as out:
            fd = -1
            shutil.copyfileobj(source, out, 1 << 20)
    except BaseException:
        if fd != -1:
            os.close(fd)
        Path(dst).unlink(missing_ok=True)
        raise
    return Path(dst)


def open_private(
    path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8", field: str = "path"
) -> IO[Any]:
    """Open `path` for writing ("w" text or "wb" bytes; "a" or "ab" to append) as an
    owner-only file: a new one is created 0o600; an existing file is emptied (or appended
    to) and, if it is this account's regular file, tightened (a device such as /dev/null is
    written as it is). A symbolic link is refused, not followed; a missing or unwritable
    folder is an InvalidInputError in one sentence."""
    if mode not in ("w", "wb", "a", "ab"):
        raise ValueError(f"open_private writes files: mode w, wb, a or ab, not {mode!r}")
    keep = os.O_APPEND if mode.startswith("a") else os.O_TRUNC
    dest = destination(path)
    try:
        try:
            fd = create_private(dest)
        except FileExistsError:
            if dest.is_symlink():  # Windows has no O_NOFOLLOW
                raise
            fd = os.open(dest, os.O_WRONLY | keep | _NOFOLLOW | _CLOEXEC | _BINARY)
            try:
                st = os.fstat(fd)
                fchmod = getattr(os, "fchmod", None)
                if stat.S_ISREG(st.st_mode) and st.st_uid == _uid() and fchmod is not None:
                    fchmod(fd, stat.S_IMODE(st.st_mode) & 0o700)
            except BaseException:
                os.close(fd)
                raise
    except OSError as exc:
        raise _refusal(dest, exc, field) from None
    if mode.endswith("b"):
        return os.fdopen(fd, mode)
    return os.fdopen(fd, mode, encoding=encoding)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield an empty owner-only temporary file beside `path` for the block to write (by
    name: for writers that take a path, such as converters and quantizers); when the block
    succeeds the file is flushed to disk and renamed over `path`, when it fails it is
    removed."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        _set_mode(tmp, PRIVATE_FILE)  # mkstemp's 0o600 is subject to the umask
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Replace the file at `path` with `data` (text is written as UTF-8) in one step; the
    folder must exist. Returns `path`."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        fh.write(payload)
    return Path(path)


def _fsync(path: Path) -> None:
    """Flush `path`'s content to disk (opened for writing: Windows refuses to flush a
    read-only handle)."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty owner-only temporary folder beside `path` for the block to fill; when
    the block succeeds the folder takes `path`'s place (an old one is removed first), when it
    fails it is removed. An interrupted build never leaves half a folder under `path`."""
    path = Path(path)
    private_dir(path.parent)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        _set_mode(work, PRIVATE_DIR)  # mkdtemp's 0o700 is subject to the umask
        yield work
        if path.exists():
            shutil.rmtree(path)
        os.replace(work, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
