"""Consensus decoding: the selection rule, and the whole path on the tiny real model."""

from __future__ import annotations

from collections import Counter

import pytest

from edge_pllm.decoding.consensus import choose, tokens, unigram_f1


def test_the_candidate_the_others_agree_with_wins():
    candidates = [
        "gitk: fix colors",  # shares two words with each of the next two
        "gitk: fix the error when changing colors",
        "gitk: fix error when closing the window",
        "docs: typo",
    ]
    # summed F1 against the rest: the second shares most with the first and the third
    assert choose(candidates) == 1
    assert choose(["same words", "same words", "other"]) == 0  # a tie goes to the earliest
    assert choose(["", "", "a b"]) == 2  # an empty answer never wins over a real one
    assert choose([""]) == 0
    with pytest.raises(ValueError):
        choose([])


def test_unigram_f1_is_rouge_1():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    pairs = [
        ("Fix the Bug in foo.c", "foo.c: fix bug"),
        ("ENH: add np.unpackbits little endian", "BUG: unpackbits, little-endian fix"),
        ("a a a b", "a b b"),
        ("", "nothing shared"),
        ("Ünïcode wörds 42", "unicode words 42"),
    ]
    for a, b in pairs:
        ours = unigram_f1(Counter(tokens(a)), Counter(tokens(b)))
        assert ours == pytest.approx(scorer.score(b, a)["rouge1"].fmeasure)


@pytest.mark.parametrize("spec", ["consensus", "consensus-beam"])
def test_consensus_answers_with_the_candidate_its_members_agree_on(pllm, spec):
    """On the real model: the answer is choose() over exactly the candidates the members
    give (greedy, or with `consensus-beam` the best of a beam search 4 wide; then sampled
    with seeds 1..N), streamed whole, and reproducible."""
    from dataclasses import replace

    from edge_pllm.decoding.answers import AnswerReader
    from edge_pllm.decoding.beam import beam_answers
    from edge_pllm.decoding.consensus import BEAM_MEMBERS, DEFAULT_MEMBERS
    from edge_pllm.decoding.decoders import resolve
    from edge_pllm.errors import InvalidInputError
    from edge_pllm.inference.llm import SamplingConfig
    from edge_pllm.personalization.prompts import PromptStyle

    pllm.add("ada", ["Fix the parser crash on empty input", "docs: explain the cache budget"])
    query = "Write a one-line commit subject for: the parser crashed when the input was empty."
    sampling = SamplingConfig(max_tokens=12)
    line = PromptStyle(one_line=True)
    reader = AnswerReader.of(pllm.llm, line.answer, line.one_line)
    members = resolve(spec).decoder.members
    assert members == {"consensus": DEFAULT_MEMBERS, "consensus-beam": BEAM_MEMBERS}[spec]
    candidates = []
    for member in members:
        p = pllm.prepare("ada", query, member, sampling, line)
        if spec == "consensus-beam":
            soft = p.personalization.soft_tokens
            beams = beam_answers(pllm.llm, p.prompt, soft, sampling, p.placement, reader, 4)
            candidates.append(beams[0].text)
        else:
            candidates.append(
                pllm.generate("ada", query, strategy=member, sampling=sampling, style=line).text
            )
        for seed in (1, 2):
            draw = replace(sampling, temperature=0.8, seed=seed)
            candidates.append(
                pllm.generate("ada", query, strategy=member, sampling=draw, style=line).text
            )
    assert len(set(candidates)) > 1  # the samples differ, so the choice means something

    answer = pllm.generate("ada", query, strategy=f"{spec}:2", sampling=sampling, style=line)
    assert answer.text == candidates[choose(candidates)]
    assert answer.strategy == spec
    seen = []
    pieces = list(
        pllm.stream(
            "ada",
            query,
            strategy=f"{spec}:2",
            sampling=sampling,
            style=line,
            on_prepared=seen.append,
        )
    )
    assert pieces == [answer.text]
    info = seen[0].personalization.info["consensus"]
    assert info["candidates"] == 3 * len(members) and candidates[info["candidate"]] == answer.text

    # Candidates are compared by what of them counts (the task's style says): when every
    # candidate counts the same, the first one wins the tie: for an answer that is not one
    # line, the first member's greedy answer (a beam searches one-line answers only).
    alike = PromptStyle(answer=lambda text: "the same line")
    tied = pllm.generate("ada", query, strategy=f"{spec}:2", sampling=sampling, style=alike)
    greedy = pllm.generate("ada", query, strategy=members[0], sampling=sampling, style=alike)
    assert tied.text == greedy.text

    with pytest.raises(InvalidInputError):
        pllm.prepare("ada", query, "consensus")
    with pytest.raises(InvalidInputError):
        pllm.generate("ada", query, strategy=f"{spec}:17")
    with pytest.raises(InvalidInputError):
        SamplingConfig(seed=-1)
