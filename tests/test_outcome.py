"""Training on what decoding writes (`--outcome-samples`): answers sampled through the soft
tokens on the tiny Llama, scored against the gold, and a policy gradient on the head."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="training needs the [export] extra")

from edge_pllm.errors import InvalidInputError  # noqa: E402
from export import pplug  # noqa: E402
from export.pplug.outcome import answer_scores, outcome_loss, sample_answers  # noqa: E402

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


@pytest.fixture(scope="module")
def session(tiny_bundle, tmp_path_factory):  # noqa: F811
    tiny, bundle = tiny_bundle
    config = small_config(tiny, outcome_samples=2)
    return pplug.setup(
        bundle, _examples(), SPEC, config, tmp_path_factory.mktemp("home"), progress=False
    )


def _batch(s):
    """Both examples: prompts, request keys and values, soft tokens (with gradient)."""
    hists = [s.table(e.texts) for e in s.examples]
    soft = pplug.soft_tokens(s.head, s.query_inputs([e.query for e in s.examples]), hists)
    return s.encoded, [s.prefixes[i] for i in range(len(s.examples))], soft


def _log_probs(s, prompts, prefixes, soft, answers) -> torch.Tensor:
    k = len(answers) // len(prompts)
    rows = [i for i in range(len(prompts)) for _ in range(k)]
    encoded = [
        pplug.Encoded(prompts[i].before, prompts[i].after, list(a))
        for i, a in zip(rows, answers, strict=True)
    ]
    losses, mask = pplug.token_losses(
        s.llm, encoded, soft[rows], s.embed_scale, [prefixes[i] for i in rows]
    )
    return -(losses * mask).sum(dim=1)


def test_sampled_answers_are_scored_as_the_teacher_forced_pass_scores_them(session):
    s = session
    prompts, prefixes, soft = _batch(s)
    assert len({len(p.before) for p in prompts}) == 2  # left padding is exercised
    torch.manual_seed(0)
    answers, logp = sample_answers(
        s.llm, prompts, prefixes, soft.detach(), s.embed_scale, 3, s.stops, max_new_tokens=6
    )
    assert len(answers) == 6
    for a in answers:  # each ends at a stop token or at the cap, never past a stop
        assert 1 <= len(a) <= 6
        assert all(t not in s.stops for t in a[:-1])
        assert len(a) == 6 or a[-1] in s.stops
    # The log-probability gathered while sampling (request cached, one token at a time)
    # is the teacher-forced one: positions, masks and padding agree.
    with torch.no_grad():
        forced = _log_probs(s, prompts, prefixes, soft, answers)
    torch.testing.assert_close(logp, forced, atol=2e-3, rtol=1e-4)
    assert len({tuple(a) for a in answers}) > 1  # sampled, not one answer repeated


def test_an_answer_is_scored_as_the_task_reads_it(session):
    s = session
    llama = s.encode.llm.llama
    ids = llama.tokenize(b"Fix the parser\nand more", add_bos=False, special=False)
    assert s.answer_text([*ids, llama.token_eos()]) == "Fix the parser"  # its first line
    scores = answer_scores([ids, ids], ["fix the parser", "update docs"], s.answer_text)
    assert scores.tolist() == [1.0, 0.0]


def test_the_outcome_term_raises_the_better_answer_against_the_worse(session):
    s = session
    prompts, prefixes, soft = _batch(s)
    torch.manual_seed(3)
    answers, _ = sample_answers(
        s.llm, prompts, prefixes, soft.detach(), s.embed_scale, 2, s.stops, max_new_tokens=5
    )
    assert answers[0] != answers[1]
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0])  # the first answer of prompt 0, second of 1
    saved = {k: v.clone() for k, v in s.head.state_dict().items()}
    try:
        with torch.no_grad():
            before = _log_probs(s, prompts, prefixes, soft, answers)
        s.head.zero_grad()
        outcome_loss(s.llm, prompts, prefixes, soft, s.embed_scale, answers, scores).backward()
        params = [p for p in s.head.parameters() if p.grad is not None]
        norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
        with torch.no_grad():  # a short step down the gradient: the first-order change
            for p in params:
                p -= 1e-3 / norm * p.grad
        with torch.no_grad():
            _, _, soft_after = _batch(s)
            after = _log_probs(s, prompts, prefixes, soft_after, answers)
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
    assert "--init-from" in config.command("task") and "--outcome-samples 2" in config.command(
        "task"
    )
    moved = small_config(tiny, steps=1, lr=1e-2, outcome_samples=2, init_from=str(init_dir))
    head, _ = pplug.train(bundle, _examples(), SPEC, tmp_path / "b", moved, progress=False)
    assert any(
        not torch.equal(value, start[name].reshape(value.shape))
        for name, value in head.state_dict().items()
    )


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
