"""Training on what decoding writes (`--outcome-samples`): answers sampled through the soft
tokens on the tiny Llama, scored against the gold, and a policy gradient on the head."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="training needs the [export] extra")

from edge_pllm.decoding.answers import AnswerReader  # noqa: E402
from edge_pllm.errors import InvalidInputError  # noqa: E402
from export import pplug  # noqa: E402
from export.pplug.outcome import (  # noqa: E402
    answer_log_probs,
    answer_scores,
    outcome_loss,
    sample_answers,
)

from .test_pplug import HISTORY, SPEC, small_config, tiny_bundle, trained  # noqa: E402, F401

# Requests of different lengths: their keys and values are left-padded into one batch.
QUERIES = ["Say my word.", "Say my word, and only that word, in one short line please."]


def _examples() -> list[pplug.Example]:
    return [
        pplug.Example.of_texts(user, SPEC.query(query), texts, word)
        for (user, texts), query, word in zip(
            HISTORY.items(), QUERIES, ["parser", "docs"], strict=True
        )
    ]


def _session(built, home, **settings):
    tiny, bundle = built
    config = small_config(tiny, outcome_samples=2, **settings)
    return pplug.setup(bundle, _examples(), SPEC, config, home, progress=False)


@pytest.fixture(scope="module")
def session(tiny_bundle, tmp_path_factory):  # noqa: F811
    return _session(tiny_bundle, tmp_path_factory.mktemp("home"))


def _batch(s):
    """Both examples: prompts, request keys and values, soft tokens (with gradient)."""
    hists = [s.table(e.texts) for e in s.examples]
    soft = pplug.soft_tokens(s.head, s.query_inputs([e.query for e in s.examples]), hists)
    return s.encoded, [s.prefixes[i] for i in range(len(s.examples))], soft


@pytest.mark.parametrize("placement", ["before_answer", "prefix"])
def test_sampled_answers_are_scored_as_the_teacher_forced_pass_scores_them(
    session,
    tiny_bundle,  # noqa: F811
    tmp_path,
    placement,
):
    s = (
        session
        if placement == "before_answer"
        else _session(tiny_bundle, tmp_path, placement=placement)
    )
    prompts, prefixes, soft = _batch(s)
    if placement == "before_answer":  # requests of two lengths: left padding is exercised
        assert len({len(p.before) for p in prompts}) == 2
    else:  # the whole prompt follows the soft tokens: two groups are sampled
        assert len({len(p.after) for p in prompts}) == 2
    torch.manual_seed(0)
    answers, logp = sample_answers(
        s.llm, prompts, prefixes, soft.detach(), s.embed_scale, 3, s.reader, max_new_tokens=6
    )
    assert len(answers) == 6
    for a in answers:  # each ends where the device stops, or at the cap, never past it
        assert 1 <= len(a) <= 6
        assert not any(s.reader.ended(a[:n]) for n in range(1, len(a)))
        assert len(a) == 6 or s.reader.ended(a)
    # The log-probability gathered while sampling (request cached, one token at a time)
    # is the teacher-forced one: positions, masks and padding agree.
    with torch.no_grad():
        forced = answer_log_probs(s.llm, prompts, prefixes, soft, s.embed_scale, answers)
    torch.testing.assert_close(logp, forced, atol=2e-3, rtol=1e-4)
    assert len({tuple(a) for a in answers}) > 1  # sampled, not one answer repeated


def _ids(s, text: str) -> list[int]:
    return s.encode.llm.llama.tokenize(text.encode(), add_bos=False, special=False)


def test_an_answer_ends_and_is_scored_where_the_device_ends_and_reads_it(session):
    s = session
    reader: AnswerReader = s.reader
    eos = s.encode.llm.llama.token_eos()
    assert reader.ended([*_ids(s, "Fix the parser"), eos])
    assert not reader.ended(_ids(s, "Fix the parser"))
    # A line that only announces the answer, or an empty one, does not end it ...
    announced = _ids(s, "The subject line is:\n\n")
    assert any(t in reader.breaks for t in announced) and not reader.ended(announced)
    # ... the end of the first line with an answer does.
    answered = _ids(s, "The subject line is:\nFix the parser\n")
    assert reader.ended(answered)
    assert reader.text(answered) == reader.text([*_ids(s, "Fix the parser"), eos])
    assert reader.text(answered) == "Fix the parser"
    scores = answer_scores([answered, answered], ["fix the parser", "update docs"], reader)
    assert scores.tolist() == [1.0, 0.0]


def test_sampling_keeps_the_devices_top_k_top_p_and_min_p_before_the_temperature():
    from edge_pllm.inference.llm import SamplingConfig
    from export.pplug.outcome import _sampler_probs

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.04, 0.01]])
    logits = torch.log(probs)
    # min-p (0.05 of the likeliest) drops the last token; top-k 3 the fourth
    kept = _sampler_probs(logits, SamplingConfig(temperature=1.0, top_k=3, top_p=1.0))
    torch.testing.assert_close(kept, torch.tensor([[0.5, 0.3, 0.15, 0.0, 0.0]]) / 0.95)
    # top-p 0.7: the likeliest tokens until their mass reaches it (0.5, then 0.3)
    kept = _sampler_probs(logits, SamplingConfig(temperature=1.0, top_k=0, top_p=0.7))
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0, 0.0]]))
    # the temperature acts on what is left: 0.5 squares the odds 5:3 into 25:9
    kept = _sampler_probs(logits, SamplingConfig(temperature=0.5, top_k=0, top_p=0.7))
    torch.testing.assert_close(kept, torch.tensor([[25 / 34, 9 / 34, 0.0, 0.0, 0.0]]))


def test_the_outcome_term_raises_the_better_answer_against_the_worse(session):
    s = session
    prompts, prefixes, soft = _batch(s)
    torch.manual_seed(3)
    answers, _ = sample_answers(
        s.llm, prompts, prefixes, soft.detach(), s.embed_scale, 2, s.reader, max_new_tokens=5
    )
    assert answers[0] != answers[1]
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0])  # the first answer of prompt 0, second of 1
    saved = {k: v.clone() for k, v in s.head.state_dict().items()}
    try:
        with torch.no_grad():
            before = answer_log_probs(s.llm, prompts, prefixes, soft, s.embed_scale, answers)
        s.head.zero_grad()
        logp = answer_log_probs(s.llm, prompts, prefixes, soft, s.embed_scale, answers)
        outcome_loss(logp, scores, 2).backward()
        params = [p for p in s.head.parameters() if p.grad is not None]
        norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
        with torch.no_grad():  # a short step down the gradient: the first-order change
            for p in params:
                p -= 1e-3 / norm * p.grad
        with torch.no_grad():
            _, _, soft_after = _batch(s)
            after = answer_log_probs(s.llm, prompts, prefixes, soft_after, s.embed_scale, answers)
    finally:
        s.head.load_state_dict(saved)
    moved = after - before
    assert moved[0] > moved[1] and moved[3] > moved[2]
    assert moved[0] - moved[1] > 1e-4


def test_training_with_outcome_samples_starts_from_another_head(tiny_bundle, trained, tmp_path):  # noqa: F811
    tiny, bundle = tiny_bundle
    init_dir = trained[3]
    start = torch.load(init_dir / "checkpoint.pt", weights_only=False)["head"]
    config = small_config(tiny, steps=1, lr=0.0, outcome_samples=2, init_from=str(init_dir))
    head, result = pplug.train(bundle, _examples(), SPEC, tmp_path / "a", config, progress=False)
    assert result.final_score is not None and 0.0 <= result.final_score <= 1.0
    for name, value in head.state_dict().items():  # lr 0: the start, exactly
        torch.testing.assert_close(value, start[name].reshape(value.shape), rtol=0, atol=0)
    command = config.command("task")
    assert f"--init-from {init_dir}" in command and "--outcome-samples 2" in command


def test_a_start_that_is_not_a_head_of_these_settings_is_refused(tiny_bundle, trained, tmp_path):  # noqa: F811
    tiny, bundle = tiny_bundle
    other = small_config(tiny, persona_tokens=2, init_from=str(trained[3]))
    with pytest.raises(InvalidInputError, match="another head") as error:
        pplug.train(bundle, _examples(), SPEC, tmp_path / "a", other, progress=False)
    assert error.value.field == "init_from"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInputError, match=r"holds no checkpoint\.pt") as error:
        pplug.train(
            bundle, _examples(), SPEC, tmp_path / "b", small_config(tiny, init_from=str(empty)),
            progress=False,
        )  # fmt: skip
    assert error.value.field == "init_from"
