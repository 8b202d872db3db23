"""PersonalLLM end to end on the default bundle: strategies, isolation, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_pllm import (
    ContextOverflowError,
    InvalidInputError,
    SamplingConfig,
    UnknownStrategyError,
    UnknownUserError,
)
from edge_pllm.personalization.strategies import Retrieval, get_strategy
from edge_pllm.storage.items import MAX_ITEM_CHARS
from edge_pllm.storage.parts import PART_CHARS, part_spans

ALICE = [
    "fix(parser): handle blank lines at the end of the file",
    "docs: explain how the cache directory is chosen",
    "feat(cli): add a --json flag to the status command",
    "refactor(store): write rows and vectors in one transaction",
]
BOB = [
    "My grandmother's apple pie needs a pinch of cinnamon.",
    "Parser for sourdough starters: feed it twice a day.",
    "The cache of jam jars in the cellar is running low.",
]


@pytest.fixture
def loaded(pllm):
    pllm.add("alice", ALICE)
    pllm.add("bob", BOB)
    return pllm


def test_rag_context_comes_only_from_the_requesting_user(loaded):
    for user, own in (("alice", ALICE), ("bob", BOB)):
        for query in ("the parser and the cache", "apple pie recipe", "json status flag"):
            # Every nearest item shown, relevant or not: the most a search could leak.
            prepared = loaded.prepare(user, query, Retrieval(k=10, min_similarity=-1.0))
            texts = [item.text for item in prepared.personalization.context]
            assert texts and set(texts) <= set(own)
            assert all(item.user == user for item in prepared.personalization.context)
            other = BOB if user == "alice" else ALICE
            assert not any(t in prepared.prompt for t in other)


def test_rag_ranks_the_relevant_item_first(loaded):
    prepared = loaded.prepare("alice", "How is the cache directory picked?", "rag:2")
    assert prepared.personalization.context[0].text == ALICE[1]


LONG_NOTE = "\n\n".join(
    [f"The shed holds tool number {i} next to the lawn mower and the rakes." for i in range(40)]
    + ["The spare house key is hidden under the blue flower pot by the door."]
)


def test_rag_shows_the_part_of_a_long_note_that_was_found(pllm):
    (note_id,) = pllm.add("dora", [LONG_NOTE])
    pllm.add("dora", ["Buy milk and bread.", "Call the plumber on Monday."])
    found = Retrieval(k=1, min_similarity=-1.0)  # which passage shows, whatever its score
    prepared = pllm.prepare("dora", "Where is the spare house key hidden?", found)
    (shown,) = prepared.personalization.context
    assert shown.id == note_id and shown.text.endswith("blue flower pot by the door.")
    assert len(shown.text) <= PART_CHARS and "tool number 0 " not in prepared.prompt
    assert shown.metadata["passage"].endswith(f"/{len(part_spans(LONG_NOTE))}")


def test_a_long_remembered_turn_and_a_long_edit_are_searchable_to_their_end(pllm):
    pllm.add("dora", ["Buy milk and bread."])
    sampling = SamplingConfig(max_tokens=4)
    response = pllm.generate("dora", LONG_NOTE, strategy="rag", sampling=sampling, remember=True)
    assert response.memory is not None and response.memory.remembered
    edit = LONG_NOTE.replace("spare house key", "garage remote")
    pllm.feedback("dora", response.id, edit=edit)
    assert pllm.store.vector_count("dora") == 1 + 2 * (1 + len(part_spans(LONG_NOTE)))
    for asked, kind in (("spare house key", "turn"), ("garage remote", "edit")):
        hit = pllm.search("dora", f"Where is the {asked}?", 1)[0]
        assert hit.item.kind == kind and hit.part is not None and asked in hit.passage.text


def test_recent_uses_newest_items_first(pllm):
    pllm.add("carol", [{"text": f"note {i}", "created_at": f"2024-01-0{i}"} for i in range(1, 6)])
    prepared = pllm.prepare("carol", "anything", "recent:2")
    assert [i.text for i in prepared.personalization.context] == ["note 5", "note 4"]


def test_none_adds_nothing(loaded):
    prepared = loaded.prepare("alice", "Say hi.", "none")
    assert prepared.personalization.context == [] and prepared.personalization.soft_tokens is None
    assert not any(t in prepared.prompt for t in ALICE)


def test_generate_and_stream_agree_and_report_context(loaded):
    sampling = SamplingConfig(max_tokens=24)
    every = Retrieval(k=3, min_similarity=-1.0)  # the three nearest, however far
    request = "Write a commit subject for a json fix."
    response = loaded.generate("alice", request, strategy=every, sampling=sampling)
    streamed = "".join(loaded.stream("alice", request, strategy=every, sampling=sampling))
    assert response.text == streamed and response.text.strip()
    assert response.strategy == "rag" and len(response.context_ids) == 3
    assert response.completion.completion_tokens > 0


def test_history_that_overflows_the_context_is_cut_whole_items_first(pllm):
    long_items = [f"item {i}: " + "lorem ipsum dolor sit amet " * 35 for i in range(12)]
    pllm.add("dave", long_items)
    prepared = pllm.prepare("dave", "Summarize.", "recent:12", SamplingConfig(max_tokens=256))
    kept = len(prepared.personalization.context)
    assert 0 < kept < 12 and prepared.dropped_context == 12 - kept
    assert prepared.prompt.rstrip().endswith("assistant")  # the request itself is intact
    assert "Summarize." in prepared.prompt
    assert pllm.llm.count_tokens(prepared.prompt) + 256 <= pllm.llm.n_ctx


def test_request_too_long_even_without_history_is_an_error(pllm):
    with pytest.raises(ContextOverflowError):
        pllm.generate("anyone", "word " * 2000, strategy="none")


def test_bad_input_leaves_the_store_unchanged(loaded):
    before = [(u.name, u.items) for u in loaded.store.users()], loaded.store.vector_count()
    for bad in (["ok", "   "], [b"\xc3\x28"], ["x" * (MAX_ITEM_CHARS + 1)], []):
        with pytest.raises(InvalidInputError):
            loaded.add("alice", bad)
    with pytest.raises(InvalidInputError):
        loaded.add("  ", ["fine"])
    after = [(u.name, u.items) for u in loaded.store.users()], loaded.store.vector_count()
    assert after == before


def test_unknown_user_gets_the_plain_prompt_and_bad_strategies_typed_errors(loaded):
    plain = loaded.prepare("nobody", "hi", "none").prompt
    for spec in ("recent", "rag", "plug-own"):
        prepared = loaded.prepare("nobody", "hi", spec)
        assert prepared.personalization.info["fallback"] == "no history: plain prompt"
        assert prepared.prompt == plain
        assert prepared.personalization.soft_tokens is None
    # The default head ships its population history: plug gives a newcomer the population
    # persona (the same for every newcomer), with no history items in the prompt.
    for spec in ("plug", "plug+rag"):
        prepared = loaded.prepare("nobody", "hi", spec)
        assert prepared.personalization.info["fallback"] == "no history: population persona"
        assert prepared.prompt == plain and not prepared.personalization.context
        other = loaded.prepare("someone else", "hi", spec).personalization.soft_tokens
        assert np.array_equal(prepared.personalization.soft_tokens, other)
    assert not loaded.store.has_user("nobody")
    with pytest.raises(UnknownUserError):
        loaded.store.items("nobody")
    with pytest.raises(UnknownStrategyError, match="choose one of"):
        loaded.generate("alice", "hi", strategy="telepathy")
    with pytest.raises(InvalidInputError):
        get_strategy("rag:zero")
    with pytest.raises(InvalidInputError):
        loaded.generate("alice", "   ", strategy="none")


def test_forget_and_delete_drop_the_cached_prompt(loaded):
    """The KV cache holds the last prompt (a user's retrieved items); erasing that user's
    data must not leave it in the model's memory for the next prefix match."""
    sampling = SamplingConfig(max_tokens=4)
    loaded.generate("alice", "Write a commit subject for a json fix.", sampling=sampling)
    assert loaded.llm.llama.n_tokens > 0
    loaded.delete("alice", [loaded.store.items("alice")[0].id])
    assert loaded.llm.llama.n_tokens == 0
    loaded.generate("alice", "Write a commit subject for a json fix.", sampling=sampling)
    assert loaded.forget("alice") == len(ALICE) - 1
    assert loaded.llm.llama.n_tokens == 0


def test_the_population_prior_gives_way_to_the_users_own_persona(pllm):
    """plug = α·own + (1 − α)·population with α = n / (n + 2): one item weighs 1/3, and the
    own persona takes over as the history grows; plug-own is the own persona alone."""
    from edge_pllm.personalization.strategies import POPULATION_PRIOR

    query = "Write a commit subject: the parser crashed on blank lines"
    population = pllm.prepare("nobody", query, "plug").personalization.soft_tokens
    texts = [f"fix(parser): case {i} of blank lines" for i in range(10)]
    have = 0
    for n in (1, 3, 10):
        pllm.add("grower", texts[have:n])
        have = n
        mixed = pllm.prepare("grower", query, "plug").personalization
        own = pllm.prepare("grower", query, "plug-own").personalization.soft_tokens
        weight = POPULATION_PRIOR / (n + POPULATION_PRIOR)
        assert mixed.info["population_weight"] == pytest.approx(weight, abs=1e-4)
        expected = (1 - weight) * own + weight * population
        assert np.allclose(mixed.soft_tokens, expected, atol=1e-5)
        assert not np.allclose(own, population, atol=1e-3)  # the user's own persona differs


def test_a_one_line_style_answers_with_the_first_line_and_stops_there(pllm):
    """A task whose scorer reads one line (PromptStyle.one_line) gets that line, and the
    generation ends there: the same greedy answer, cut, and far fewer tokens decoded."""
    from edge_pllm.personalization.prompts import PromptStyle

    query = "List three fruits, one per line, then say why you like each of them."
    sampling = SamplingConfig(max_tokens=64)
    whole = pllm.generate("nobody", query, strategy="none", sampling=sampling)
    lines = [line.strip() for line in whole.text.splitlines() if line.strip()]
    assert len(lines) > 1  # the model writes several lines when allowed
    style = PromptStyle(one_line=True)
    one = pllm.generate("nobody", query, strategy="none", sampling=sampling, style=style)
    assert one.text == lines[0]
    assert (
        "".join(pllm.stream("nobody", query, strategy="none", sampling=sampling, style=style))
        == lines[0]
    )
    assert (
        pllm.llm._llama.n_tokens
        < whole.completion.prompt_tokens + whole.completion.completion_tokens
    )


def test_retrieval_shows_only_relevant_items_and_says_when_none_is(pllm):
    from edge_pllm.personalization.strategies import MIN_SIMILARITY, NOT_RELEVANT, NOT_RELEVANT_PLUG

    pllm.add("alice", ["parser: skip blank lines in the config file", "cache: drop stale keys"])
    plain = pllm.prepare("alice", "Bake a rye bread with caraway seeds", "none").prompt
    far = pllm.prepare("alice", "Bake a rye bread with caraway seeds", "rag:2").personalization
    assert far.context == [] and far.info["fallback"] == NOT_RELEVANT
    assert pllm.prepare("alice", "Bake a rye bread with caraway seeds", "rag:2").prompt == plain
    near = pllm.prepare("alice", "the parser fails on blank lines in the config", "rag:2")
    shown = near.personalization
    assert [i.text for i in shown.context] == ["parser: skip blank lines in the config file"]
    assert all(1 - d >= MIN_SIMILARITY for d in shown.info["distances"])
    assert "fallback" not in shown.info and "skip blank lines" in near.prompt
    persona = pllm.prepare("alice", "Bake a rye bread with caraway seeds", "plug+rag:1")
    assert persona.personalization.soft_tokens is not None
    assert persona.personalization.info["fallback"] == NOT_RELEVANT_PLUG


def test_a_one_shot_runtime_lets_the_encoders_go_before_the_llm_answers(
    default_bundle: Path, isolated_home: Path
):
    """`one_shot` (edge-pllm ask): the same answers, the embedder and the head let go once
    the prompt is personalized; kept when the turn is to be remembered (it is embedded)."""
    from edge_pllm import LLMConfig, PersonalLLM, SamplingConfig

    config = LLMConfig(n_ctx=1024, n_threads=1)
    sampling = SamplingConfig(max_tokens=6)
    request = "Write a commit subject: the parser crashed on blank lines"
    with PersonalLLM(default_bundle, home=isolated_home, llm_config=config) as kept:
        kept.add("ann", ["fix: handle empty config", "docs: explain the cache flag"])
        expected = {s: kept.generate("ann", request, strategy=s, sampling=sampling).text
                    for s in ("plug", "rag", "consensus")}  # fmt: skip
    with PersonalLLM(default_bundle, home=isolated_home, llm_config=config, one_shot=True) as lean:
        for strategy, text in expected.items():
            assert lean.generate("ann", request, strategy=strategy, sampling=sampling).text == text
            assert lean._embedder._embedder is None and lean._plug is None
        # A turn to remember: plug embedded the request, so nothing stays for it...
        lean.generate("ann", request, strategy="plug", sampling=sampling, remember=True)
        assert lean._embedder._embedder is None and lean._plug is None
        # ...none did not: the embedder stays to embed the turn after the answer.
        lean.generate("ann", request + "?", strategy="none", sampling=sampling, remember=True)
        assert lean._embedder._embedder is not None
        assert lean.store.count("ann") == 4  # both turns stored
