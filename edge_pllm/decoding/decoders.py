"""How an answer is drawn from prepared prompts, apart from what goes into them.

A strategy spec resolves to a `Plan`: the prompt strategies to prepare
(personalization/strategies.py: what goes into a prompt) and the decoder that draws the
answer from those prompts. `Direct` draws one answer from one prompt with the request's
sampling, streamed as it is generated; `Consensus` (consensus.py) draws several from each
member's prompt and keeps the one the others agree with, so it answers whole. `Drawer`
(drawer.py) is the one place that turns a prepared prompt into text through the LLM. A
package adds strategies and decoders through an `edge_pllm.strategies` entry point
(`load_plugins`), as commands join the CLI through `edge_pllm.commands`.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..errors import UnknownStrategyError
from ..inference.llm import SamplingConfig
from ..personalization.prompts import PromptStyle
from ..personalization.strategies import (
    OPENING,
    REGISTRY,
    Opening,
    Strategy,
    get_strategy,
    spec_k,
)
from .consensus import BEAM_MEMBERS, BEAM_SAMPLES, BEAM_WIDTH, DEFAULT_SAMPLES, Consensus
from .drawer import Drawer, Drawn, Prepared


@runtime_checkable
class Decoder(Protocol):
    """Draws the answer from the prompts of a `Plan`. `streams`: one prompt, its answer
    yielded as it is generated; else the answer is chosen whole, then given at once.
    `members`: the prompt strategies' specs it draws from (none: the spec's own prompt);
    `suffixed`: the same decoder over its members each with a suffix (`+opening`)."""

    name: str
    streams: bool
    members: tuple[str, ...]

    def suffixed(self, suffix: str) -> Decoder: ...

    def draw(
        self,
        drawer: Drawer,
        prepared: Sequence[Prepared],
        sampling: SamplingConfig,
        style: PromptStyle,
    ) -> Drawn: ...


@dataclass(frozen=True)
class Direct:
    """One answer from one prompt, with the request's own sampling."""

    name: str = "direct"
    streams: bool = field(default=True, init=False)
    members: tuple[str, ...] = field(default=(), init=False)

    def suffixed(self, suffix: str) -> Direct:
        return self

    def draw(
        self,
        drawer: Drawer,
        prepared: Sequence[Prepared],
        sampling: SamplingConfig,
        style: PromptStyle,
    ) -> Drawn:
        return prepared[0], *drawer.answer(prepared[0], sampling, style)


@dataclass(frozen=True)
class Plan:
    """A strategy spec resolved: its name, the prompts to prepare (one per member) and the
    decoder that draws the answer from them."""

    name: str
    prompts: tuple[Strategy, ...]
    decoder: Decoder


DecoderFactory = Callable[[int | None], Decoder]

DECODERS: dict[str, DecoderFactory] = {
    "consensus": lambda k: Consensus(samples=DEFAULT_SAMPLES if k is None else k),
    "consensus-beam": lambda k: Consensus(
        samples=BEAM_SAMPLES if k is None else k,
        members=BEAM_MEMBERS,
        beam_width=BEAM_WIDTH,
        name="consensus-beam",
    ),
}


def register_decoder(name: str, factory: DecoderFactory) -> None:
    """Make a decoder available by name, as `name` or `name:N` (`N` is the factory's)."""
    DECODERS[name] = factory


PLUGINS_GROUP = "edge_pllm.strategies"  # the entry-point group (public: kept)
_plugins_loaded = False
_plugins_lock = threading.RLock()


def load_plugins() -> None:
    """Call, once, every `edge_pllm.strategies` entry point other packages declare: each
    is a function that adds its strategies (`strategies.register`) and decoders
    (`register_decoder`). A broken one is reported as a warning; the others load."""
    global _plugins_loaded
    with _plugins_lock:  # a second caller waits for the registries to be whole
        if _plugins_loaded:
            return
        _plugins_loaded = True
        _load_entry_points()


def _load_entry_points() -> None:
    from importlib import metadata

    for entry in metadata.entry_points(group=PLUGINS_GROUP):
        try:
            entry.load()()
        except Exception as exc:  # a broken plugin must not take the runtime down with it
            warnings.warn(
                f"Could not load the strategies of {entry.value} ({exc}).",
                RuntimeWarning,
                stacklevel=2,
            )


def names() -> list[str]:
    """Every strategy and decoder name a spec may start with."""
    load_plugins()
    return sorted({*REGISTRY, *DECODERS})


def resolve(spec: str | Strategy | Decoder) -> Plan:
    """The `Plan` a spec names: `rag:3` (one prompt, drawn directly), `consensus:2` (its
    members' prompts, drawn by consensus), either with `+opening` (every prompt opening
    the way the user opens theirs); a Strategy or Decoder object stands for itself.
    UnknownStrategyError for a name neither registry has."""
    load_plugins()
    if isinstance(spec, Decoder):
        return Plan(spec.name, tuple(get_strategy(m) for m in spec.members), spec)
    if not isinstance(spec, str):
        return Plan(spec.name, (spec,), Direct())
    spec = spec.strip()
    if spec.endswith(OPENING) and spec != OPENING:
        inner = resolve(spec.removesuffix(OPENING))
        prompts = tuple(Opening(p) for p in inner.prompts)
        return Plan(inner.name + OPENING, prompts, inner.decoder.suffixed(OPENING))
    name, _, k_text = spec.partition(":")
    if name not in DECODERS:
        try:
            strategy = get_strategy(spec)
        except UnknownStrategyError:
            raise UnknownStrategyError(name, names()) from None
        return Plan(strategy.name, (strategy,), Direct())
    return resolve(DECODERS[name](spec_k(spec, k_text)))
