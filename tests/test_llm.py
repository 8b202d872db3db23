"""The llama.cpp wrapper on the real default model: soft tokens, template, streaming."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from edge_pllm.errors import BundleError, ContextOverflowError, SoftTokenShapeError
from edge_pllm.inference.llm import LLM, LLMConfig, SamplingConfig
from edge_pllm.inference.token_rows import batch_invariant

TEXT = "Persona-Plug feeds a user embedding to a frozen model as a soft token."


def test_token_embedding_rows_as_soft_tokens_match_tokens_exactly(llm, token_embd):
    ids = llm.tokenize(TEXT)
    by_tokens = llm.next_token_logits(ids)
    by_rows = llm.logits_for_embeddings(token_embd[ids])
    np.testing.assert_array_equal(by_tokens, by_rows)


def test_soft_prefix_then_tokens_matches_tokens(llm, token_embd):
    """The generation path: k soft rows, then the rest as tokens, KV cache kept between."""
    ids = llm.tokenize(TEXT)
    by_tokens = llm.next_token_logits(ids)
    for k in (1, 3, 7):
        mixed = llm.next_token_logits(ids[k:], soft=token_embd[ids[:k]])
        np.testing.assert_array_equal(by_tokens, mixed)


def test_soft_tokens_longer_than_n_batch_are_chunked(default_bundle, token_embd):
    small = LLM(default_bundle / "llm.gguf", LLMConfig(n_ctx=256, n_batch=8, n_threads=2))
    ids = small.tokenize(TEXT * 2)
    assert len(ids) > 2 * 8
    np.testing.assert_array_equal(
        small.next_token_logits(ids), small.logits_for_embeddings(token_embd[ids])
    )


def test_random_soft_token_changes_logits(llm):
    ids = llm.tokenize(TEXT)
    plain = llm.next_token_logits(ids)
    soft = np.random.default_rng(0).normal(0, 0.05, (2, llm.n_embd)).astype(np.float32)
    with_soft = llm.next_token_logits(ids, soft=soft)
    assert np.abs(plain - with_soft).max() > 0.1


def test_generation_keeps_the_soft_prefix(llm, token_embd):
    """Greedy generation after soft rows equal to the prompt's first tokens = plain generation,
    and differs once the soft rows are something else: the prefix reaches generate()."""
    prompt = llm.apply_chat_template([{"role": "user", "content": "Name three colors."}])
    ids = llm.tokenize(prompt)
    sampling = SamplingConfig(max_tokens=16)
    plain = llm.complete(prompt, sampling=sampling).text
    # Prompt text without its first k tokens, with those tokens fed as soft rows instead.
    k = 4
    rest = llm.llama.detokenize(ids[k:], special=True).decode()
    assert llm.tokenize(rest) == ids[k:]
    same = llm.complete(rest, soft=token_embd[ids[:k]], sampling=sampling)
    assert same.text == plain and same.soft_tokens == k
    noise = np.random.default_rng(1).normal(0, 0.5, (k, llm.n_embd)).astype(np.float32)
    assert llm.complete(rest, soft=noise, sampling=sampling).text != plain


def test_previous_soft_prefix_never_leaks_into_next_call(llm):
    prompt = llm.apply_chat_template([{"role": "user", "content": "Say hello."}])
    sampling = SamplingConfig(max_tokens=12)
    plain = llm.complete(prompt, sampling=sampling).text
    noise = np.random.default_rng(2).normal(0, 0.5, (3, llm.n_embd)).astype(np.float32)
    llm.complete(prompt, soft=noise, sampling=sampling)
    assert llm.complete(prompt, sampling=sampling).text == plain


def test_repeated_prompt_reuses_the_kv_cache_exactly(llm):
    """A repeated [soft; prompt] skips its prefill and answers bit-identically; another soft
    prefix (another user's persona) reuses nothing past BOS and answers exactly as with an
    empty cache."""
    prompt = llm.apply_chat_template([{"role": "user", "content": "Describe your week."}])
    n_ids = len(llm.tokenize(prompt))
    sampling = SamplingConfig(max_tokens=12)
    rng = np.random.default_rng(4)
    alice, bob = (rng.normal(0, 0.5, (2, llm.n_embd)).astype(np.float32) for _ in range(2))

    def from_empty_cache(text: str, soft: np.ndarray) -> str:
        llm.reset()
        return llm.complete(text, soft=soft, sampling=sampling).text

    first = llm.complete(prompt, soft=alice, sampling=sampling)
    again = llm.complete(prompt, soft=alice, sampling=sampling)
    assert again.cached_tokens == n_ids + 2 - 1  # everything but the last prompt token
    assert again.text == first.text

    other = llm.complete(prompt, soft=bob, sampling=sampling)
    assert other.cached_tokens <= 1  # at most the BOS before the soft rows
    assert other.text != first.text
    assert other.text == from_empty_cache(prompt, bob)
    assert first.text == from_empty_cache(prompt, alice)

    # Same persona, another question: the soft prefix is reused, the new text computed.
    llm.complete(prompt, soft=bob, sampling=sampling)
    follow = llm.apply_chat_template([{"role": "user", "content": "Describe your day."}])
    reused = llm.complete(follow, soft=bob, sampling=sampling)
    assert 2 <= reused.cached_tokens < len(llm.tokenize(follow)) + 2 - 1
    assert reused.text == from_empty_cache(follow, bob)


def test_answers_side_by_side_over_a_long_context_with_one_decode_thread(default_bundle):
    """Past 512 cached positions llama.cpp splits a lone token's attention among the decode
    threads; with one decode thread it does not, and answers drawn side by side are still
    the answers drawn one at a time."""
    from dataclasses import replace

    one = LLM(default_bundle / "llm.gguf", LLMConfig(n_ctx=1024, n_threads=1))
    story = " ".join(f"Day {i}: the keeper lit the lamp and logged the weather." for i in range(45))
    prompt = one.apply_chat_template([{"role": "user", "content": story + " Summarize."}])
    assert one.count_tokens(prompt) > 512
    greedy = SamplingConfig(max_tokens=10)
    samplings = [greedy, *(replace(greedy, temperature=0.9, seed=s) for s in (1, 2, 3))]
    alone = [one.complete(prompt, None, s).text for s in samplings]
    assert [c.text for c in one.draw(prompt, None, samplings)] == alone


def test_soft_rows_before_the_answer_reuse_the_cache_exactly(llm):
    """Soft rows before the answer's header: a repeat reuses the request and computes the
    rows and the header (one batch, every time), answering bit-identically; another
    persona reuses the request alone and answers as from an empty cache."""
    prompt = llm.apply_chat_template([{"role": "user", "content": "Describe your week."}])
    before, after = llm.split_prompt(prompt, "before_answer")
    assert len(after) > 1  # the header: several tokens, the case this covers
    sampling = SamplingConfig(max_tokens=12)
    rng = np.random.default_rng(5)
    alice, bob = (rng.normal(0, 0.5, (3, llm.n_embd)).astype(np.float32) for _ in range(2))

    def complete(soft: np.ndarray):
        return llm.complete(prompt, soft=soft, sampling=sampling, placement="before_answer")

    llm.reset()
    first = complete(alice)
    again = complete(alice)
    assert again.cached_tokens == len(before)
    assert again.text == first.text
    other = complete(bob)
    assert other.cached_tokens == len(before)
    llm.reset()
    assert complete(bob).text == other.text


@pytest.fixture
def decode_calls(monkeypatch) -> list[int]:
    """The size of every batch llama_decode is given while the test runs, in order."""
    import llama_cpp

    calls: list[int] = []
    real = llama_cpp.llama_cpp.llama_decode

    def counted(ctx, batch):
        calls.append(batch.n_tokens)
        return real(ctx, batch)

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_decode", counted)
    monkeypatch.setattr(llama_cpp, "llama_decode", counted)
    return calls


def test_the_whole_prompt_travels_with_the_soft_rows_in_one_pass(
    llm, token_embd, monkeypatch, decode_calls
):
    """The request's uncached tokens and the answer's header go in the soft rows' embedding
    batch as their own token rows (read from the GGUF as llama.cpp reads them): one
    llama_decode for the whole prompt, as the bare prompt takes; the very same answers as
    with the request decoded as tokens first (and the header too), and a repeat, whose
    request is cached, bit-identical to the first call."""

    assert llm._one_pass  # Q4_1 weights: every row computed alone, whatever its batch
    header = llm.split_prompt(
        llm.apply_chat_template([{"role": "user", "content": "hi"}]), "before_answer"
    )[1]
    np.testing.assert_array_equal(llm.token_rows(header), token_embd[header])
    prompt = llm.apply_chat_template([{"role": "user", "content": "Describe your week."}])
    soft = np.random.default_rng(6).normal(0, 0.5, (3, llm.n_embd)).astype(np.float32)
    sampling = SamplingConfig(max_tokens=12)
    llm.reset()
    llm.llama.create_completion(llm.tokenize(prompt), max_tokens=1)  # bare llama-cpp-python
    bare = len(decode_calls)
    answers, passes = [], []
    # One pass; the request apart; the request and the header each apart (as tokens).
    for one_pass, rows in ((True, llm.token_rows), (False, llm.token_rows), (False, None)):
        monkeypatch.setitem(llm.__dict__, "_rows_batch_invariant", one_pass)
        monkeypatch.setitem(llm.__dict__, "token_rows", rows)
        llm.reset()
        decode_calls.clear()
        llm.complete(prompt, soft, SamplingConfig(max_tokens=1), "before_answer")
        passes.append(len(decode_calls))
        llm.reset()
        answers.append(llm.complete(prompt, soft, sampling, "before_answer").text)
        answers.append(llm.complete(prompt, soft, sampling, "before_answer").text)  # cached
        answers.append(llm.draw(prompt, soft, [sampling] * 2, "before_answer")[1].text)
    assert passes == [bare, bare + 1, bare + 2]
    assert len(set(answers)) == 1 and answers[0]


def test_batch_invariant_weights_are_told_by_their_type(llm, tmp_path):
    """Q4_1 (the default model) is computed row by row in any batch; a Q4_0 copy, which
    llama.cpp repacks on most CPUs, is not taken for it, nor is a file that is no GGUF."""
    import llama_cpp

    assert batch_invariant(llm.path, llama_cpp)
    q4_0 = tmp_path / "q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, True
    code = llama_cpp.llama_model_quantize(
        str(llm.path).encode(), str(q4_0).encode(), ctypes.byref(params)
    )
    assert code == 0
    assert not batch_invariant(q4_0, llama_cpp)
    (tmp_path / "text.gguf").write_text("not a model")
    assert not batch_invariant(tmp_path / "text.gguf", llama_cpp)


def test_stream_equals_complete_at_temperature_zero(llm):
    prompt = llm.apply_chat_template([{"role": "user", "content": "Write a haiku about git."}])
    sampling = SamplingConfig(max_tokens=40, temperature=0.0)
    soft = np.random.default_rng(3).normal(0, 0.05, (2, llm.n_embd)).astype(np.float32)
    for s in (None, soft):
        whole = llm.complete(prompt, soft=s, sampling=sampling).text
        streamed = "".join(llm.stream(prompt, soft=s, sampling=sampling))
        assert whole and streamed == whole


@pytest.mark.parametrize("placement", ["prefix", "before_answer"])
def test_answers_drawn_side_by_side_are_the_answers_drawn_one_at_a_time(llm, placement):
    """`draw` decodes several answers in one batch per step: each is the answer `complete`
    gives alone with the same sampling (greedy, sampled with seeds, shorter max_tokens, a
    stop string), bit for bit, soft tokens or not; and the cache it leaves serves the next
    call exactly."""
    from dataclasses import replace

    prompt = llm.apply_chat_template([{"role": "user", "content": "Name three colours."}])
    soft = np.random.default_rng(3).normal(0, 0.02, (3, llm.n_embd)).astype(np.float32)
    greedy = SamplingConfig(max_tokens=24)
    samplings = [
        greedy,
        *(replace(greedy, temperature=0.9, seed=seed) for seed in (1, 2, 3, 4, 5)),
        replace(greedy, max_tokens=5, temperature=0.9, seed=6),
        replace(greedy, stop=("\n",)),
    ]
    for rows in (None, soft):
        alone = [llm.complete(prompt, rows, s, placement) for s in samplings]
        together = llm.draw(prompt, rows, samplings, placement)
        assert [c.text for c in together] == [c.text for c in alone]
        assert len({c.text for c in together}) > 3  # the seeds gave different answers
        for a, b in zip(alone, together, strict=True):
            assert b.completion_tokens == len(b.ids) and b.prompt_tokens == a.prompt_tokens
        assert together[6].finish_reason == "length" and together[6].completion_tokens == 5
        assert "\n" in llm.detokenize(list(together[7].ids))  # it stopped at its stop string
        assert "\n" not in together[7].text
        after = llm.complete(prompt, rows, samplings[1], placement)
        llm.reset()
        assert after.text == llm.complete(prompt, rows, samplings[1], placement).text

    ended = llm.draw(prompt, None, samplings[:3], placement, ended=lambda ids: len(ids) == 2)
    assert [len(c.ids) for c in ended] == [2, 2, 2]
    assert llm.draw(prompt, None, []) == []
    many = [replace(greedy, max_tokens=2, temperature=0.9, seed=s) for s in range(70)]
    assert len(many) > llm.max_sequences  # drawn in turns, each answer still its own
    assert [c.text for c in llm.draw(prompt, None, many)] == [
        llm.complete(prompt, None, s).text for s in many
    ]


def test_only_answers_of_one_prompt_with_the_same_tokens_are_alike():
    """`_alike` groups live answers by prompt and every token so far, first seen first:
    answers of two prompts never share a row, even with the same tokens; an ended answer
    (not live) is in no group."""
    from edge_pllm.inference.llm import _alike

    ids = [[5, 6], [5, 6], [5, 7], [5, 6], [5, 6], [5, 6]]
    prompt_of = [0, 0, 0, 1, 1, 0]
    assert _alike([0, 1, 2, 3, 4], prompt_of, ids) == [[0, 1], [2], [3, 4]]
    assert _alike([2, 4, 1], prompt_of, ids) == [[2], [4], [1]]
    assert _alike([], prompt_of, ids) == []


def test_answers_that_sampled_alike_share_a_row_until_they_part(llm, decode_calls):
    """Answers of one prompt with the same tokens so far are one batch row and one cell per
    step between them (a token of several sequences): three greedy answers cost the rows
    of one; sampled answers that part take a row each from there on, each still the answer
    drawn alone."""
    from dataclasses import replace

    prompt = llm.apply_chat_template([{"role": "user", "content": "Name three colours."}])
    greedy = SamplingConfig(max_tokens=12)
    llm.reset()
    decode_calls.clear()
    one = llm.draw(prompt, None, [greedy])
    rows_of_one = sum(decode_calls)
    llm.reset()
    decode_calls.clear()
    three = llm.draw(prompt, None, [greedy, greedy, replace(greedy, max_tokens=6)])
    assert sum(decode_calls) == rows_of_one
    assert [c.text for c in three[:2]] == [one[0].text] * 2
    assert three[2].ids == one[0].ids[:6]

    sampled = [replace(greedy, temperature=1.5, seed=s) for s in range(1, 9)]
    llm.reset()
    decode_calls.clear()
    drawn = llm.draw(prompt, None, sampled)
    decoded = sum(decode_calls[1:])  # after the prompt's pass
    assert len({c.text for c in drawn}) > 1
    assert decoded < sum(len(c.ids) - 1 for c in drawn)  # some rows were shared
    assert [c.text for c in drawn] == [llm.complete(prompt, None, s).text for s in sampled]


def test_prompts_drawn_together_are_the_prompts_drawn_one_after_another(llm, decode_calls):
    """`draw_each` decodes the answers of several prompts side by side, a later prompt
    sharing the first one's keys and values up to where their tokens part (a request, and
    the same request with a retrieved item after it): each
    answer is the one `draw` gives that prompt after the one before it, in fewer decode
    passes, and the first prompt is what the cache keeps."""
    from dataclasses import replace

    from edge_pllm.inference.llm import Ask

    request = "Write a subject line for: fix the parser's crash on empty input."
    plain = llm.apply_chat_template([{"role": "user", "content": request}])
    shown = llm.apply_chat_template(
        [{"role": "user", "content": request + "\n\nEarlier: parser: handle tabs"}]
    )
    rng = np.random.default_rng(7)
    soft = [rng.normal(0, 0.02, (3, llm.n_embd)).astype(np.float32) for _ in range(2)]
    greedy = SamplingConfig(max_tokens=16)
    samplings = (greedy, *(replace(greedy, temperature=0.8, seed=s) for s in (1, 2, 3)))
    asks = [
        Ask(plain, soft[0], samplings, "before_answer"),
        Ask(shown, soft[1], samplings[:2], "before_answer"),
        Ask(plain, None, (), "prefix"),
    ]
    llm.reset()
    alone = [llm.draw(a.prompt, a.soft, a.samplings, a.placement) for a in asks]
    apart = len(decode_calls)
    llm.reset()
    decode_calls.clear()
    together = llm.draw_each(asks)
    assert len(decode_calls) < apart
    assert [[c.text for c in d] for d in together] == [[c.text for c in d] for d in alone]
    assert len({c.text for c in together[0]}) > 1 and together[2] == []
    shared = together[1][0].cached_tokens
    assert 0 < shared < together[1][0].prompt_tokens - len(soft[1])
    again = llm.complete(plain, soft[0], greedy, "before_answer")
    assert again.cached_tokens == len(llm.split_prompt(plain, "before_answer")[0])
    assert again.text == together[0][0].text


def test_answers_that_together_overflow_the_cache_are_drawn_in_turns(default_bundle):
    """All sequences share one cache of n_ctx cells: answers that would not fit it side by
    side are drawn in turns that do, and each is still the answer drawn alone."""
    from dataclasses import replace

    small = LLM(default_bundle / "llm.gguf", LLMConfig(n_ctx=256, n_threads=1))
    prompt = small.apply_chat_template([{"role": "user", "content": TEXT * 4}])
    n_prompt = small.count_tokens(prompt)
    room = small.n_ctx - n_prompt
    assert 40 < room < 200
    long = SamplingConfig(max_tokens=room, temperature=0.9, stop=("\n\n\n\n",))
    samplings = [replace(long, seed=s) for s in range(4)]  # 4 × room cells: no single turn
    together = small.draw(prompt, None, samplings)
    assert [c.text for c in together] == [small.complete(prompt, None, s).text for s in samplings]
    assert max(c.completion_tokens for c in together) > room // 2  # they did need the room


def test_chat_template_matches_llama_cpp_builtin(llm):
    """Our Jinja rendering of the GGUF template equals llama.cpp's own C++ renderer."""
    import llama_cpp

    messages = [
        {"role": "system", "content": "You write commit subjects."},
        {"role": "user", "content": "Body: fix the crash on empty input."},
    ]
    ours = llm.apply_chat_template(messages)
    chat = (llama_cpp.llama_chat_message * len(messages))()
    for slot, m in zip(chat, messages, strict=True):
        slot.role, slot.content = m["role"].encode(), m["content"].encode()
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(
        llm.chat_template.encode(), chat, len(messages), True, buf, len(buf)
    )
    assert n > 0
    assert ours == buf.raw[:n].decode()
    assert ours.startswith("<|im_start|>system\nYou write commit subjects.<|im_end|>")


@pytest.mark.parametrize(
    "shape", [(2, 575), (2, 577), (0, 576), (576,), (1, 2, 576)], ids=lambda s: str(s)
)
def test_soft_tokens_of_wrong_shape_are_refused(llm, shape):
    with pytest.raises(SoftTokenShapeError) as err:
        llm.complete("hi", soft=np.zeros(shape, dtype=np.float32))
    assert err.value.n_embd == 576


def test_non_finite_soft_tokens_are_refused(llm):
    soft = np.zeros((1, llm.n_embd), dtype=np.float32)
    soft[0, 3] = np.nan
    with pytest.raises(SoftTokenShapeError):
        llm.complete("hi", soft=soft)


def test_context_overflow_is_an_error_with_the_numbers(llm):
    prompt = "word " * 1200
    with pytest.raises(ContextOverflowError) as err:
        llm.complete(prompt, sampling=SamplingConfig(max_tokens=10))
    assert err.value.n_ctx == 1024 and err.value.prompt_tokens > 1024
    with pytest.raises(ContextOverflowError) as err:
        llm.complete("short", sampling=SamplingConfig(max_tokens=1024))
    assert err.value.max_tokens == 1024


def test_a_context_size_llama_cpp_rounds_up_is_kept_as_asked(default_bundle: Path):
    """llama.cpp makes n_ctx 192 a 256-token context, but llama-cpp-python's token buffer
    stays 192: a prompt between the two is refused with the numbers, not a crash."""
    small = LLM(default_bundle / "llm.gguf", LLMConfig(n_ctx=192, n_threads=2))
    assert small.n_ctx == 192
    with pytest.raises(ContextOverflowError) as err:
        small.complete("word " * 200, sampling=SamplingConfig(max_tokens=4))
    assert err.value.n_ctx == 192
    assert small.complete("hi", sampling=SamplingConfig(max_tokens=2)).text is not None


def test_corrupt_gguf_is_a_bundle_error(tmp_path: Path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(BundleError):
        LLM(bad)
    with pytest.raises(BundleError, match="does not exist"):
        LLM(tmp_path / "missing.gguf")


def test_the_token_bound_holds_for_any_text(llm, gemma_file):
    """`most_tokens` bounds the token count without tokenizing (a prompt that fits by it is
    never counted): on SmolLM2's byte-level BPE and Gemma's SentencePiece with byte
    fallback, for text of every script, control characters, special tokens and spaces."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    from edge_pllm.inference.llm import LLM, LLMConfig

    gemma = LLM(gemma_file, LLMConfig(n_ctx=256, n_threads=1))
    pieces = st.sampled_from(["<|im_start|>", "<start_of_turn>", "<bos>", " ", "\n", "  ", "é"])
    texts = st.lists(st.text(min_size=0, max_size=40) | pieces, max_size=12).map("".join)

    @hypothesis.settings(max_examples=300, deadline=None, database=None)
    @hypothesis.given(texts)
    def bound_holds(text: str) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return  # lone surrogates: refused by tokenize and most_tokens alike
        for model in (llm, gemma):
            assert len(model.tokenize(text)) <= model.most_tokens(text), (model.architecture, text)

    bound_holds()
