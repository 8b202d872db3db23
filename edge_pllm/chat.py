"""An `edge-pllm chat` session: the conversation, its settings and the last kept answer,
the session's slash commands, and Ctrl-C that ends a reply rather than the session. (The
command itself, its options and the prompt loop are in `cli.py`.)"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import click

from .decoding.decoders import names as decoder_names
from .decoding.decoders import resolve
from .errors import ContextOverflowError
from .inference.llm import SamplingConfig
from .personal import PersonalLLM, Prepared, Response
from .terminal import shown


def count_of(n: int, noun: str) -> str:
    """`1 item`, `2 items`."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


COMMANDS = """\b
Commands in the session:
  /rate +1|-1       rate the last answer (kept only with memory on)
  /edit TEXT        the text you kept instead of the last answer: stored as your
                    own writing, and the answer's place in the conversation
  /remember on|off  remember each turn from now on, or not
  /strategy NAME    personalize with another strategy (rag:3, recent, none, ...)
  /reset            clear the conversation (history and memory stay)
  /help             this list
  /quit             leave (so does Ctrl-D)
  //TEXT            send /TEXT as a message"""


@contextlib.contextmanager
def sigint_as_flag() -> Iterator[list[bool]]:
    """While inside, Ctrl-C (SIGINT) only sets the yielded flag, so that a reply stops at
    its next piece with the model's state whole; outside, Ctrl-C is KeyboardInterrupt."""
    import signal

    flag = [False]

    def handler(signum: int, frame: Any) -> None:
        flag[0] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C stays what it was
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class ChatSession:
    """One `edge-pllm chat` session: the conversation, its settings, the last kept answer."""

    def __init__(
        self,
        pllm: PersonalLLM,
        user: str,
        strategy: str,
        remember: bool,
        system: str | None,
        sampling: SamplingConfig,
    ):
        self.pllm, self.user, self.strategy = pllm, user, strategy
        self.remember, self.system, self.sampling = remember, system, sampling
        self.turns: list[dict[str, str]] = []  # user and assistant turns, in pairs
        self.kept: str | None = None  # the last answer's id, when it was kept
        self.not_kept = "There is no answer to rate or edit yet."  # why, when it was not

    @staticmethod
    def note(text: str) -> None:
        click.secho(shown(text), dim=True)

    def handle(self, line: str) -> bool:
        """Act on one line the user typed; False ends the session."""
        if line.startswith("/") and not line.startswith("//"):
            name, _, arg = line[1:].partition(" ")
            return self.command(name.strip(), arg.strip())
        self.reply(line.removeprefix("/"))
        return True

    def command(self, name: str, arg: str) -> bool:
        if name in ("quit", "exit"):
            return False
        if name == "help":
            click.echo(COMMANDS.removeprefix("\b\n"))
        elif name == "reset":
            self.turns.clear()
            self.note("Conversation cleared.")
        elif name == "remember" and arg in ("", "on", "off"):
            self.remember = self.remember if not arg else arg == "on"
            self.note(f"Memory {'on' if self.remember else 'off'}.")
        elif name == "remember":
            click.echo("Use /remember on or /remember off.")
        elif name == "strategy":
            if arg:
                resolve(arg)  # an unknown name or a bad k is refused here, not mid-turn
                self.strategy = arg
            self.note(f"Strategy {self.strategy} (known: {', '.join(decoder_names())}).")
        elif name == "rate" and arg not in ("+1", "1", "-1"):
            click.echo("Use /rate +1 or /rate -1.")
        elif name == "edit" and not arg:
            click.echo("Use /edit TEXT: the text you kept instead of the last answer.")
        elif name in ("rate", "edit") and self.kept is None:
            click.echo(self.not_kept)
        elif name == "rate" and self.kept is not None:
            done = self.pllm.feedback(self.user, self.kept, rating=int(arg))
            self.note(f"Rated the last answer {done.rating:+d}.")
        elif name == "edit" and self.kept is not None:
            done = self.pllm.feedback(self.user, self.kept, edit=arg)
            if self.turns:
                self.turns[-1]["content"] = arg  # the conversation goes on from what you kept
            self.note(f"Kept your edit as history item #{done.edit_id}.")
        else:
            click.echo(f"Unknown command /{name}; /help lists the commands.")
        return True

    def info(self, prepared: Prepared) -> str:
        """The dim line before a reply: what personalized it, and how much conversation."""
        found = prepared.personalization
        parts = [self.strategy]
        if found.context or prepared.dropped_context:
            parts.append(count_of(len(found.context), "item"))
        if prepared.dropped_context:
            parts.append(f"{prepared.dropped_context} more left out for room")
        if found.soft_tokens is not None:
            parts.append(count_of(len(found.soft_tokens), "soft token"))
        if found.info.get("fallback"):
            parts.append(str(found.info["fallback"]))
        if self.turns:
            parts.append(count_of(len(self.turns) // 2, "earlier exchange"))
        return "[" + " · ".join(parts) + "]"

    def stream(self, current: dict[str, str], done: list[Response]) -> Iterator[str]:
        """The reply's pieces, after its dim line. The whole conversation is sent. What
        does not fit the context gives way in this order: history items (the prompt's
        rule), then the oldest exchanges, never the current turn; when the current turn
        alone does not fit, that is the error, and the conversation stays as it was."""
        lead = [{"role": "system", "content": self.system}] if self.system else []
        turns = list(self.turns)
        while True:
            prepared: list[Prepared] = []
            pieces = self.pllm.stream(
                self.user,
                [*lead, *turns, current],
                strategy=self.strategy,
                sampling=self.sampling,
                remember=self.remember,
                on_prepared=prepared.append,
                on_done=done.append,
            )
            try:
                first = next(pieces, None)  # the prompt is fitted (or refused) here
            except ContextOverflowError:
                if not turns:
                    raise
                del turns[:2]
                continue
            break
        if len(turns) < len(self.turns):
            dropped = (len(self.turns) - len(turns)) // 2
            self.turns = turns
            self.note(
                f"({count_of(dropped, 'earlier exchange')} no longer fit the context and left "
                "the conversation.)"
            )
        self.note(self.info(prepared[-1]))
        if first is not None:
            yield first
            yield from pieces

    def reply(self, text: str) -> None:
        if not text.strip():
            return
        current = {"role": "user", "content": text}
        done: list[Response] = []
        printed: list[str] = []
        with sigint_as_flag() as stop:
            pieces = self.stream(current, done)
            try:
                for piece in pieces:
                    printed.append(piece)
                    click.echo(shown(piece), nl=False)
                    if stop[0]:
                        break
            finally:
                pieces.close()  # a stream left early ends here: nothing of it is remembered
                if printed:
                    click.echo()
        answer = "".join(printed)
        if not done:  # Ctrl-C: what was shown stays in the conversation, not in memory
            self.note("[reply interrupted; not remembered]" if self.remember else "[interrupted]")
            self.kept, self.not_kept = None, "The last reply was interrupted, so it was not kept."
            if answer.strip():
                self.turns += [current, {"role": "assistant", "content": answer}]
            return
        self.turns += [current, {"role": "assistant", "content": answer}]
        memory = done[0].memory
        if memory is None:
            self.kept = None
            self.not_kept = (
                "Only a kept answer can be rated or edited: turn memory on (--remember or "
                "/remember on) before the answer."
            )
        elif memory.remembered:
            self.kept = done[0].id
        else:
            self.kept, self.not_kept = None, f"The last answer was not kept: {memory.reason}"
            self.note(f"Not remembered: {memory.reason}")
