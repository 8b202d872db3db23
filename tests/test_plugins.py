"""A package adds a prompt strategy and a decoder through the `edge_pllm.strategies` entry
point: no file of edge-pllm names them, and they answer on the real model."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from edge_pllm import SamplingConfig
from edge_pllm.decoding import decoders as decoding
from edge_pllm.decoding.decoders import Drawer, resolve
from edge_pllm.errors import UnknownStrategyError
from edge_pllm.personalization.prompts import PromptStyle

PLUGIN = '''
from dataclasses import dataclass, field

from edge_pllm.decoding import decoders as decoding
from edge_pllm.personalization import strategies


@dataclass(frozen=True)
class Newest:
    """The user's single newest item, whatever the request."""

    name: str = "newest"
    needs_head: bool = field(default=False, init=False)

    def personalize(self, request):
        items = request.store.items(request.user, limit=1)
        return strategies.Personalization(context=items, info={"plugin": "newest"})


@dataclass(frozen=True)
class Longest:
    """The longest of a greedy answer and `samples` sampled ones, from one prompt."""

    samples: int = 2
    name: str = "longest"
    streams: bool = field(default=False, init=False)
    members: tuple = field(default=("none",), init=False)

    def suffixed(self, suffix):
        return self

    def draw(self, drawer, prepared, sampling, style):
        from dataclasses import replace

        texts = [drawer.answer(prepared[0], sampling, style)[0]]
        for seed in range(1, self.samples + 1):
            draw = replace(sampling, temperature=1.2, seed=seed)
            texts.append(drawer.answer(prepared[0], draw, style)[0])
        return prepared[0], max(texts, key=len), None


def setup():
    strategies.register("newest", lambda k: Newest())
    decoding.register_decoder("longest", lambda k: Longest(samples=k or 2))
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An installed distribution (a dist-info on sys.path) declaring the entry point."""
    (tmp_path / "edge_pllm_newest.py").write_text(textwrap.dedent(PLUGIN))
    info = tmp_path / "edge_pllm_newest-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: edge-pllm-newest\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[edge_pllm.strategies]\nnewest = edge_pllm_newest:setup\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(decoding, "_plugins_loaded", False)
    from edge_pllm.personalization import strategies

    monkeypatch.setattr(strategies, "REGISTRY", dict(strategies.REGISTRY))
    monkeypatch.setattr(decoding, "REGISTRY", strategies.REGISTRY)
    monkeypatch.setattr(decoding, "DECODERS", dict(decoding.DECODERS))
    yield


def test_a_plugin_adds_a_strategy_and_a_decoder_that_answer(plugin, pllm):
    pllm.add("ann", ["Older note about tomatoes.", "Newest note: the shed key is blue."])
    assert {"newest", "longest"} <= set(decoding.names())
    prepared = pllm.prepare("ann", "Anything new?", "newest")
    assert [i.text for i in prepared.personalization.context] == [
        "Newest note: the shed key is blue."]  # fmt: skip
    assert resolve("newest+opening").prompts[0].inner.name == "newest"
    short = SamplingConfig(max_tokens=12)
    longest = pllm.generate("ann", "Say something.", strategy="longest:3", sampling=short)
    assert longest.strategy == "longest"
    # What the decoder drew from: the greedy answer and three samples of the plain prompt.
    prepared = pllm.prepare("ann", "Say something.", "none", short)
    drawer, style = Drawer(pllm.llm), PromptStyle()
    draws = [short] + [replace(short, temperature=1.2, seed=seed) for seed in (1, 2, 3)]
    texts = [drawer.answer(prepared, draw, style)[0] for draw in draws]
    assert longest.text == max(texts, key=len) and len(set(texts)) > 1


def test_without_the_plugin_its_names_are_unknown():
    with pytest.raises(UnknownStrategyError):
        resolve("newest")


def test_plugins_written_for_the_flat_layout_still_import():
    """`from edge_pllm import decoding, strategies, prompts` (the names before the
    subpackages) gives the same registries."""
    from edge_pllm import decoding as old_decoding
    from edge_pllm import prompts as old_prompts
    from edge_pllm import strategies as old_strategies
    from edge_pllm.personalization import prompts as new_prompts
    from edge_pllm.personalization import strategies as new_strategies

    assert old_strategies is new_strategies and old_prompts is new_prompts
    assert old_decoding.register_decoder is decoding.register_decoder
    assert old_decoding.Drawer is Drawer and old_decoding.resolve is resolve
    with pytest.raises(AttributeError):
        old_decoding.no_such_name  # noqa: B018
