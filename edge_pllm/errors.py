"""Typed errors. Every error carries the facts as fields and a plain sentence as its message.

Callers (the CLI, the server) map these by type, never by message text.
"""

from __future__ import annotations


class EdgePLLMError(Exception):
    """Base class of every error edge-pllm raises on purpose."""


class InvalidInputError(EdgePLLMError, ValueError):
    """Input that cannot be stored or used as given (empty text, bad bytes, too large, ...)."""

    def __init__(self, message: str, *, field: str | None = None, index: int | None = None):
        self.field = field
        self.index = index
        where = f" (item {index})" if index is not None else ""
        super().__init__(message + where)


class GitError(InvalidInputError):
    """A git repository that cannot be read as asked (no git, no repository, no commits by
    the author named): `repo` is the path given."""

    def __init__(self, message: str, *, repo: str, field: str = "git"):
        self.repo = repo
        super().__init__(message, field=field)


class UnknownUserError(EdgePLLMError, LookupError):
    """The named user has no history in this store."""

    def __init__(self, user: str):
        self.user = user
        super().__init__(f"No user named {user!r} in this store; add history for {user!r} first.")


class ItemNotFoundError(EdgePLLMError, LookupError):
    """A history item id that does not exist (or belongs to another user)."""

    def __init__(self, item_id: int, user: str | None = None):
        self.item_id = item_id
        self.user = user
        owner = f" for user {user!r}" if user else ""
        super().__init__(f"No history item with id {item_id}{owner}.")


class AnswerNotFoundError(EdgePLLMError, LookupError):
    """An answer id that this store keeps no record of for this user: never given, given
    without memory on (nothing was kept), another user's, or erased with its turn."""

    def __init__(self, answer_id: str, user: str | None = None):
        self.answer_id = answer_id
        self.user = user
        owner = f" of user {user!r}" if user else ""
        super().__init__(
            f"No answer {answer_id!r}{owner} is kept on this device; answers are kept for "
            "feedback only when memory is on (remember)."
        )


class ExtensionLoadingError(EdgePLLMError, RuntimeError):
    """No SQLite reachable from this Python can load the sqlite-vec extension."""

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(
            "This Python's sqlite3 cannot load extensions, so sqlite-vec is unavailable "
            f"({detail}); install a SQLite that can: `pip install pysqlite3-binary` on Linux, "
            "or use a Python built with loadable-extension support (python.org or Homebrew builds)."
        )


class StoreMismatchError(EdgePLLMError, RuntimeError):
    """The database was made for embeddings of another width than the embedder gives."""

    def __init__(self, path: str, stored_dim: int, wanted_dim: int):
        self.path = path
        self.stored_dim = stored_dim
        self.wanted_dim = wanted_dim
        super().__init__(
            f"The history database {path} holds {stored_dim}-dim embeddings but the embedder "
            f"makes {wanted_dim}-dim ones; use the bundle it was made with, or start a new "
            "database with --home."
        )


class BundleError(EdgePLLMError, RuntimeError):
    """A model bundle that is missing, incomplete, tampered with or inconsistent."""

    def __init__(self, message: str, *, bundle: str | None = None, file: str | None = None):
        self.bundle = bundle
        self.file = file
        super().__init__(message)


class LLMError(EdgePLLMError, RuntimeError):
    """llama.cpp refused an operation (`code` is llama.cpp's return code, when it gave one)."""

    def __init__(self, message: str, *, code: int | None = None):
        self.code = code
        super().__init__(message)


class ExportError(EdgePLLMError, RuntimeError):
    """A workstation export step failed (the GGUF converter, the quantizer, ...)."""


class AddressError(EdgePLLMError, OSError):
    """The server cannot listen on `host`:`port` (taken by another program, or not an
    address of this machine); `reason` is what the system said."""

    def __init__(self, host: str, port: int, reason: str):
        self.host, self.port, self.reason = host, port, reason
        super().__init__(
            f"Cannot serve on {host}:{port} ({reason}); choose another with --host or --port."
        )


class UnknownModelError(EdgePLLMError, LookupError):
    """No model is registered under `name` (`known`: those that are)."""

    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        listed = ", ".join(known) if known else "none yet"
        super().__init__(
            f"No model named {name!r} is registered (registered: {listed}); add one with "
            "`edge-pllm models add PATH`."
        )


class ModelChangedError(BundleError):
    """A registered GGUF that is gone or changed since `models add` (`reason` says which)."""

    def __init__(self, name: str, path: str, reason: str):
        self.name, self.path, self.reason = name, path, reason
        super().__init__(
            f"The model {name!r} ({path}) cannot be used: {reason}; register the file again "
            f"with `edge-pllm models remove {name}` and `edge-pllm models add PATH --name {name}`.",
            file=path,
        )


class MissingDependencyError(EdgePLLMError, ImportError):
    """An optional dependency that this action needs is not installed."""

    def __init__(self, package: str, extra: str, purpose: str, install: str | None = None):
        self.package = package
        self.extra = extra
        self.install = install or f"pip install 'edge-pllm[{extra}]'"
        super().__init__(
            f"{purpose} needs {package}, which is not installed; run `{self.install}`."
        )


class ContextOverflowError(EdgePLLMError, ValueError):
    """The prompt (plus the tokens asked for) does not fit the model's context window."""

    def __init__(self, *, prompt_tokens: int, max_tokens: int, n_ctx: int, soft_tokens: int = 0):
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.n_ctx = n_ctx
        self.soft_tokens = soft_tokens
        super().__init__(
            f"The prompt needs {prompt_tokens} tokens ({soft_tokens} of them soft) plus "
            f"{max_tokens} to generate, but the context holds {n_ctx}; shorten the prompt, "
            "lower max_tokens, or raise n_ctx."
        )


class SoftTokenShapeError(EdgePLLMError, ValueError):
    """Soft-token embeddings whose shape does not match the model."""

    def __init__(self, shape: tuple[int, ...], n_embd: int):
        self.shape = shape
        self.n_embd = n_embd
        super().__init__(
            f"Soft tokens must be a 2-D float array of shape (k, {n_embd}) for this model; "
            f"got shape {shape}."
        )


class UnknownStrategyError(EdgePLLMError, ValueError):
    """A strategy name that is not registered."""

    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        super().__init__(f"Unknown strategy {name!r}; choose one of: {', '.join(known)}.")


class PassphraseError(EdgePLLMError, PermissionError):
    """The history database and the passphrase given do not go together.

    `reason` is "wrong" (a passphrase that does not open this file), "missing" (the file is
    encrypted, or is damaged, and no passphrase was given: without one the two look
    alike), "unencrypted" (a passphrase was given for a plaintext database) or
    "not_a_database" (the file is no database, encrypted or not: too short, text, or a
    zeroed header) or "damaged" (a SQLite file that SQLite finds malformed on opening, or
    that lacks what every edge-pllm database has).
    """

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        messages = {
            "wrong": f"Cannot open {path}: the passphrase is wrong (or the file is not an "
            "edge-pllm database).",
            "missing": f"{path} is encrypted or is not an edge-pllm database (damaged?): if it "
            "is encrypted, give its passphrase (EDGE_PLLM_PASSPHRASE, --passphrase-file or "
            "--ask-passphrase; passphrase= in Python).",
            "not_a_database": f"{path} is not a database, encrypted or not (damaged, or another "
            "program's file?): move it aside to start a new one, or restore a backup.",
            "damaged": f"{path} is a damaged SQLite database, or not edge-pllm's: restore a "
            "backup, or move it aside to start a new one.",
            "unencrypted": f"{path} is not encrypted, but a passphrase was given: open it without "
            "one, or start an encrypted database in a new --home and `load` a `dump` into it.",
        }
        super().__init__(messages.get(reason, f"Cannot open {path} ({reason})."))
