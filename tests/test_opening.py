"""`+opening`: an answer that opens the way the user opens theirs ("area: "), on the real
model and store (`Personalization.answer_start`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from edge_pllm import InvalidInputError, SamplingConfig
from edge_pllm.decoding.consensus import DEFAULT_MEMBERS, Consensus
from edge_pllm.decoding.decoders import resolve
from edge_pllm.personalization.prompts import PromptStyle
from edge_pllm.personalization.strategies import (
    NoPersonalization,
    Opening,
    Personalization,
    Plug,
    Request,
    get_strategy,
    opened,
    opening,
)

PARSER_PERSON = [
    "parser: skip blank lines in the config file",
    "parser: accept tabs before a key",
    "cache: drop stale keys after an hour",
    "cache: keep the index in memory",
    "docs: say where the cache lives",
]
PLAIN_PERSON = [
    "Skip blank lines when reading the config",
    "Drop stale cache keys after an hour",
    "Explain where the cache lives",
]
QUERY = "The parser fails on a config file with blank lines at the end."
SAMPLING = SamplingConfig(max_tokens=16)


def test_an_opening_is_a_first_line_that_starts_with_an_area_and_a_colon():
    assert opening("net: fix the timeout") == "net: "
    assert opening("  builtin/add: refuse -p\n\nbody: text") == "builtin/add: "
    assert opening("Fix the parser: it drops lines") is None  # a space before the colon
    assert opening("see https://example.org for why") is None
    assert opening("body first\nnet: second line") is None
    assert opening("") is None


def test_specs_with_opening_wrap_any_strategy_and_every_consensus_member():
    wrapped = get_strategy("plug+rag:1+opening")
    assert isinstance(wrapped, Opening) and wrapped.inner == Plug(rag=1, name="plug+rag")
    assert wrapped.name == "plug+rag+opening" and wrapped.needs_head
    assert get_strategy("none+opening") == Opening(NoPersonalization())
    both = resolve("consensus:2+opening")
    assert isinstance(both.decoder, Consensus) and both.decoder.samples == 2
    assert both.name == both.decoder.name == "consensus+opening"
    assert both.decoder.members == tuple(m + "+opening" for m in DEFAULT_MEMBERS)
    assert both.prompts == tuple(Opening(get_strategy(m)) for m in DEFAULT_MEMBERS)
    direct = resolve("plug+rag:1+opening")
    assert direct.prompts == (wrapped,) and direct.decoder.streams
    for spec in ("+opening", "consensus+opening+x"):
        with pytest.raises(Exception, match="Unknown strategy"):
            resolve(spec)
    with pytest.raises(Exception, match="Unknown strategy"):
        get_strategy("consensus")  # a decoder, not a prompt


def test_the_answer_opens_with_the_nearest_items_opening_in_place_of_the_models(pllm):
    pllm.add("ann", PARSER_PERSON)
    prepared = pllm.prepare("ann", QUERY, "none+opening", SAMPLING)
    assert prepared.personalization.answer_start == "parser: "
    assert prepared.personalization.info["opening"] == "parser: "
    assert prepared.prompt == pllm.prepare("ann", QUERY, "none", SAMPLING).prompt
    plain = pllm.generate("ann", QUERY, strategy="none", sampling=SAMPLING).text
    answer = pllm.generate("ann", QUERY, strategy="none+opening", sampling=SAMPLING)
    assert answer.text == opened("parser: ", plain) and len(answer.text) > len("parser: ")
    streamed = "".join(pllm.stream("ann", QUERY, strategy="none+opening", sampling=SAMPLING))
    assert streamed == answer.text
    one_line = PromptStyle(one_line=True)
    plain_line = pllm.generate("ann", QUERY, strategy="none", sampling=SAMPLING, style=one_line)
    line = pllm.generate("ann", QUERY, strategy="none+opening", sampling=SAMPLING, style=one_line)
    assert line.text == opened("parser: ", plain_line.text) and "\n" not in line.text


def test_opened_replaces_the_models_opening_or_goes_in_front():
    assert opened("net: ", "core: fix the timeout") == "net: fix the timeout"
    assert opened("net: ", "  Fix the timeout") == "net: Fix the timeout"
    assert opened("net: ", "Fix it: now") == "net: Fix it: now"  # no opening of its own
    assert opened("net: ", "") == "net: "


def test_a_person_without_the_habit_and_a_stranger_get_the_inner_answer(pllm):
    pllm.add("ann", PARSER_PERSON)
    pllm.add("ben", PLAIN_PERSON)
    for user in ("ben", "nobody"):
        found = pllm.prepare(user, QUERY, "none+opening", SAMPLING).personalization
        assert found.answer_start == "" and "opening" not in found.info
        with_opening = pllm.generate(user, QUERY, strategy="none+opening", sampling=SAMPLING)
        assert (
            with_opening.text == pllm.generate(user, QUERY, strategy="none", sampling=SAMPLING).text
        )
        assert not with_opening.text.startswith("parser: ")


def test_the_opening_is_the_askers_own_never_another_users(pllm):
    """Two people with different habits: each answer starts with its asker's own opening."""
    pllm.add("ann", PARSER_PERSON)
    pllm.add("cid", ["config: read blank lines as empty", "config: warn on tabs"] * 2)
    assert pllm.prepare("ann", QUERY, "none+opening").personalization.answer_start == "parser: "
    assert pllm.prepare("cid", QUERY, "none+opening").personalization.answer_start == "config: "


@dataclass(frozen=True)
class _Starts:
    start: str
    name: str = "starts"
    needs_head: bool = field(default=False, init=False)

    def personalize(self, request: Request) -> Personalization:
        return Personalization(answer_start=self.start)


def test_an_opening_that_is_not_one_area_is_refused(pllm):
    for bad in ("net:\nfix: ", "net", "fix the net: ", "net:"):
        with pytest.raises(InvalidInputError, match="one 'area: '"):
            pllm.prepare("ann", QUERY, _Starts(bad))
    answer = pllm.generate("ann", QUERY, strategy=_Starts("net: "), sampling=SAMPLING)
    assert answer.text.startswith("net: ")


def test_answers_drawn_side_by_side_read_as_answers_drawn_alone(pllm):
    """`Drawer.answers` (a consensus member's candidates in one batch per step) gives what
    `Drawer.answer` gives for each sampling: the user's opening put on, a one-line answer
    cut at its line, a stop string honoured, and the cost of an answer that is not cut."""
    from dataclasses import replace

    from edge_pllm.decoding.decoders import Drawer

    pllm.add("ann", PARSER_PERSON)
    drawer = Drawer(pllm.llm)
    base = SamplingConfig(max_tokens=24)
    samplings = [base, *(replace(base, temperature=0.9, seed=s) for s in (1, 2, 3))]
    for style in (PromptStyle(one_line=True), PromptStyle()):
        for stop in ((), (".",)):
            drawn = [replace(s, stop=stop) for s in samplings]
            prepared = pllm.prepare("ann", QUERY, "plug+opening", drawn[0], style)
            assert prepared.personalization.answer_start == "parser: "
            together = drawer.answers(prepared, drawn, style)
            alone = [drawer.answer(prepared, s, style) for s in drawn]
            assert [t for t, _ in together] == [t for t, _ in alone]
            assert all(t.startswith("parser: ") for t, _ in together)
            for (_, a), (_, b) in zip(together, alone, strict=True):
                assert (a is None) == (b is None) == style.one_line
                if a is not None:
                    assert (a.text, a.completion_tokens) == (b.text, b.completion_tokens)
