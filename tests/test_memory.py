"""Memory and feedback on the real parts (the default bundle): a remembered turn is a history
item of its own kind that personalizes the next request (rag, recent, plug); every answer
has an id, and an answer kept with memory on can be rated or edited (an edit is the user's
own writing, a history item); bad feedback is a typed error that stores nothing; the edits
and good answers export as a LaMP task `train-plug` reads; through the server, by the
official `openai` client and plain HTTP, and for two users at once.

One PersonalLLM (one loaded model) serves the whole module; each test has its own users.
Generations are 1-2 tokens: what is checked is what is stored, not what is said."""

from __future__ import annotations

import http.client
import json
import socket
import stat
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_pllm import (
    AnswerNotFoundError,
    InvalidInputError,
    LLMConfig,
    NewItem,
    PersonalLLM,
    SamplingConfig,
    UnknownUserError,
)
from edge_pllm.cli import cli
from edge_pllm.storage.items import MAX_ITEM_CHARS
from edge_pllm.tasks.lamp import CHAT_TASK, load_split, task_spec

ALICE = [
    "fix(parser): handle blank lines at the end of the file",
    "docs: explain how the cache directory is chosen",
    "feat(cli): add a --json flag to the status command",
]
TURN = "I bake sourdough bread every Sunday morning with rye flour."
QUERY = "What bread should I bake this weekend?"
SHORT = SamplingConfig(max_tokens=2)


@pytest.fixture(scope="module")
def shared(default_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    with PersonalLLM(
        default_bundle,
        home=tmp_path_factory.mktemp("memory-home"),
        llm_config=LLMConfig(n_ctx=1024, n_threads=2),
    ) as pllm:
        yield pllm


def fresh(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def context_ids(pllm: PersonalLLM, user: str, query: str, strategy: str) -> list[int]:
    return [i.id for i in pllm.prepare(user, query, strategy).personalization.context]


def kept_answer(pllm: PersonalLLM, user: str, request: str, answer: str) -> str:
    """An answer kept as one given with memory on would be (without generating it)."""
    answer_id = "ans-" + uuid.uuid4().hex[:24]
    turn = NewItem(text=request, kind="turn", metadata={"answer_id": answer_id})
    vector = pllm.embedder.embed_one(request)
    pllm.store.remember(user, turn, vector, answer_id=answer_id, answer=answer, strategy="rag")
    return answer_id


def rows(pllm: PersonalLLM, table: str) -> int:
    return pllm.store._conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def snapshot(pllm: PersonalLLM) -> tuple:
    store = pllm.store
    return (
        [(u.name, u.items) for u in store.users()],
        store.vector_count(),
        rows(pllm, "answers"),
        rows(pllm, "feedback"),
    )


# --- memory -------------------------------------------------------------------------------


def test_a_remembered_turn_is_an_item_of_its_kind_that_personalizes_the_next_request(shared):
    pllm, user = shared, fresh("alice")
    pllm.add(user, ALICE)
    rag_before = context_ids(pllm, user, QUERY, "rag:1")
    recent_before = context_ids(pllm, user, QUERY, "recent:1")
    plug_before = pllm.prepare(user, QUERY, "plug").personalization.soft_tokens

    response = pllm.generate(user, TURN, sampling=SHORT, remember=True)  # rag embeds the turn
    assert response.id.startswith("ans-") and response.memory.remembered
    turn = pllm.store.items(user, limit=1)[0]
    assert (turn.id, turn.kind, turn.text) == (response.memory.item_id, "turn", TURN)
    assert turn.metadata == {"answer_id": response.id}
    assert pllm.store.count(user) == len(ALICE) + 1  # the turn only: never the answer
    ids, matrix = pllm.store.vectors(user)
    np.testing.assert_allclose(matrix[ids.index(turn.id)], pllm.embedder.embed_one(TURN), atol=1e-6)
    kept = pllm.store.answer(user, response.id)
    assert (kept.request, kept.text, kept.turn_id, kept.rating) == (
        TURN,
        response.text,
        turn.id,
        None,
    )

    # It is a history item like any other: the next request sees it.
    assert context_ids(pllm, user, QUERY, "rag:1") == [turn.id] != rag_before
    assert context_ids(pllm, user, QUERY, "recent:1") == [turn.id] != recent_before
    plug_after = pllm.prepare(user, QUERY, "plug").personalization.soft_tokens
    assert plug_after is not None and not np.array_equal(plug_after, plug_before)

    # In a conversation only the user's last turn is remembered (deduplicated by content),
    # never an earlier turn or the assistant's text.
    chat = [
        {"role": "user", "content": "EARLIER-TURN hello"},
        {"role": "assistant", "content": "ASSISTANT-TEXT hi, what do you bake?"},
        {"role": "user", "content": TURN},
    ]
    again = pllm.generate(user, chat, strategy="none", sampling=SHORT, remember=True)
    assert again.memory.item_id == turn.id and again.id != response.id
    assert pllm.store.count(user) == len(ALICE) + 1
    texts = [i.text for i in pllm.store.items(user)]
    assert not any("ASSISTANT-TEXT" in t or "EARLIER-TURN" in t for t in texts)
    assert [a.answer_id for a in pllm.store.answers(user)] == [response.id, again.id]


def test_stream_remembers_a_finished_answer_only_and_says_why_not(shared):
    pllm, user = shared, fresh("newcomer")
    done = []
    pieces = list(
        pllm.stream(
            user, "Tell me about jam jars.", sampling=SHORT, remember=True, on_done=done.append
        )
    )
    (response,) = done
    assert response.text == "".join(pieces) and response.memory.remembered
    assert pllm.store.has_user(user)  # a first-time user is created by the remembered turn
    assert pllm.store.answer(user, response.id).request == "Tell me about jam jars."
    before = snapshot(pllm)

    # An interrupted reply stores nothing.
    late = []
    stream = pllm.stream(
        user,
        "An interrupted question",
        strategy="none",
        sampling=SamplingConfig(max_tokens=4),
        remember=True,
        on_done=late.append,
    )
    next(stream)
    stream.close()
    assert late == [] and snapshot(pllm) == before

    # A turn over the memory's cap is answered, not remembered, and the answer says so.
    pllm.remember_max_chars = 16
    try:
        long = pllm.generate(
            user, "a turn over sixteen characters", strategy="none", sampling=SHORT, remember=True
        )
    finally:
        pllm.remember_max_chars = 100_000
    assert long.memory.remembered is False and "limit of 16" in long.memory.reason
    # Without memory nothing of the request or the answer is stored; the id still names it.
    plain = pllm.generate(user, "Not remembered.", strategy="none", sampling=SHORT)
    assert plain.id and plain.memory is None
    assert snapshot(pllm) == before
    for answer_id in (long.id, plain.id):
        with pytest.raises(AnswerNotFoundError):
            pllm.feedback(user, answer_id, rating=1)
    with pytest.raises(InvalidInputError, match="already used"):  # before anything is generated
        next(pllm.stream(user, "again", remember=True, answer_id=response.id))


# --- feedback -----------------------------------------------------------------------------


def test_ratings_and_edits_are_kept_and_an_edit_is_the_users_own_history(shared):
    pllm, user = shared, fresh("dora")
    pllm.add(user, ALICE)
    answer_id = kept_answer(pllm, user, "Write a subject for the cache fix.", "Fixed stuff")
    assert pllm.feedback(user, answer_id, rating=1).rating == 1
    assert pllm.feedback(user, answer_id, rating=-1).rating == -1
    assert pllm.store.answer(user, answer_id).rating == -1  # the newest rating counts
    edit = "fix(cache): pick the directory from XDG_CACHE_HOME"
    done = pllm.feedback(user, answer_id, edit=edit)
    item = pllm.store.items(user, limit=1)[0]
    assert (item.id, item.kind, item.text) == (done.edit_id, "edit", edit)
    assert item.metadata == {
        "answer_id": answer_id,
        "request": "Write a subject for the cache fix.",
    }
    assert pllm.store.answer(user, answer_id).edit == edit
    assert context_ids(pllm, user, "cache directory from XDG", "rag:1") == [item.id]
    # Deleting the edit takes its feedback row with it; deleting the turn, the answer and
    # the rest of its feedback.
    (row,) = pllm.store._conn.execute(
        "SELECT id FROM answers WHERE answer_id = ?", (answer_id,)
    ).fetchone()

    def feedback_rows() -> int:
        return pllm.store._conn.execute(
            "SELECT COUNT(*) FROM feedback WHERE answer_row = ?", (row,)
        ).fetchone()[0]

    assert feedback_rows() == 3
    pllm.delete(user, [item.id])
    assert pllm.store.answer(user, answer_id).edit is None and feedback_rows() == 2
    pllm.delete(user, [pllm.store.answer(user, answer_id).turn_id])
    with pytest.raises(AnswerNotFoundError):
        pllm.store.answer(user, answer_id)
    assert feedback_rows() == 0 and pllm.store.count(user) == len(ALICE)


def test_bad_feedback_is_a_typed_error_and_stores_nothing(shared):
    pllm = shared
    owner, other = fresh("erin"), fresh("frank")
    mine = kept_answer(pllm, owner, "A request of erin", "an answer")
    theirs = kept_answer(pllm, other, "A request of frank", "an answer")
    before = snapshot(pllm)
    cases = [
        (owner, "ans-unknown", {"rating": 1}, AnswerNotFoundError),
        (owner, theirs, {"rating": 1}, AnswerNotFoundError),  # another user's answer
        (owner, theirs, {"edit": "my text"}, AnswerNotFoundError),
        (fresh("nobody"), mine, {"rating": 1}, UnknownUserError),
        (owner, mine, {"rating": 2}, InvalidInputError),
        (owner, mine, {"rating": 0}, InvalidInputError),
        (owner, mine, {"rating": True}, InvalidInputError),
        (owner, mine, {"rating": 1.0}, InvalidInputError),
        (owner, mine, {"rating": 1, "edit": "both"}, InvalidInputError),
        (owner, mine, {}, InvalidInputError),
        (owner, mine, {"edit": "   "}, InvalidInputError),
        (owner, mine, {"edit": "x" * (MAX_ITEM_CHARS + 1)}, InvalidInputError),
        (owner, "not an id", {"rating": 1}, InvalidInputError),
    ]
    for user, answer_id, kwargs, error in cases:
        with pytest.raises(error):
            pllm.feedback(user, answer_id, **kwargs)
        assert snapshot(pllm) == before, (answer_id, kwargs)


# --- export for training ------------------------------------------------------------------


def test_edits_and_good_answers_export_as_a_lamp_task_train_plug_reads(shared, tmp_path):
    pllm, user = shared, fresh("gus")
    pllm.add(user, ALICE)
    edited = kept_answer(pllm, user, "Subject for: parser crash", "Parser fix")
    good = kept_answer(pllm, user, "Subject for: cache docs", "docs(cache): explain it")
    bad = kept_answer(pllm, user, "Subject for: json flag", "Stuff")
    kept_answer(pllm, user, "Subject for: unrated", "whatever")
    pllm.feedback(user, edited, rating=-1)
    pllm.feedback(user, edited, edit="fix(parser): survive a crash on blank lines")
    pllm.feedback(user, good, rating=1)
    pllm.feedback(user, bad, rating=-1)

    folder = tmp_path / "task"
    assert pllm.export_feedback(user, folder) == 2
    for name in ("train_questions.json", "train_outputs.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    split = load_split(folder, "train")  # the task is named in the outputs file
    assert split.spec.name == CHAT_TASK
    questions = {q.id: q for q in split.questions()}
    assert set(questions) == set(split.golds) == {edited, good}
    assert split.golds[edited] == "fix(parser): survive a crash on blank lines"
    assert split.golds[good] == "docs(cache): explain it"
    profile = [p["text"] for p in questions[edited].profile]
    assert questions[edited].input == "Subject for: parser crash"
    assert set(ALICE) <= set(profile)
    assert "Subject for: parser crash" not in profile  # never its own request
    assert "fix(parser): survive a crash on blank lines" not in profile  # nor its answer

    data = pytest.importorskip("export.pplug.data")
    examples = data.lamp_examples(folder, "train", task_spec(CHAT_TASK), from_profiles=0)
    assert sorted(e.target for e in examples) == sorted(split.golds.values())
    assert {e.query for e in examples} == {"Subject for: parser crash", "Subject for: cache docs"}
    with pytest.raises(UnknownUserError):
        pllm.export_feedback(fresh("nobody"), tmp_path / "none")


def test_the_cli_remembers_rates_edits_and_exports(default_bundle: Path, tmp_path: Path):
    runner = CliRunner()

    def run(*args: str, ok: bool = True):
        result = runner.invoke(cli, ["--bundle", str(default_bundle), "--n-ctx", "1024", *args])
        assert (result.exit_code == 0) == ok, result.output
        return result

    run("add", "hana", *ALICE)
    asked = run("ask", "hana", TURN, "-n", "2", "--remember")
    answer_id = asked.stderr.split("answer id: ")[1].split()[0]
    assert "turn remembered" in asked.stderr
    assert "Rated" in run("feedback", "hana", answer_id, "--rating", "-1").output
    assert "Rated" in run("feedback", "hana", answer_id, "--rating", "+1").output
    edited = run("feedback", "hana", answer_id, "--edit", "Sourdough, rye, Sunday.")
    assert "history item #" in edited.output
    assert "one of them" in run("feedback", "hana", answer_id, ok=False).output
    assert "No answer" in run("feedback", "hana", "ans-nope", "--rating", "1", ok=False).output
    items = [json.loads(line) for line in run("items", "hana", "--json").output.splitlines()]
    assert {i["kind"] for i in items} == {"text", "turn", "edit"}
    run("dump", "hana", "--feedback", str(tmp_path / "task"))
    assert load_split(tmp_path / "task", "train").golds == {answer_id: "Sourdough, rye, Sunday."}
    dumped = tmp_path / "hana.jsonl"
    run("dump", "hana", "-o", str(dumped))  # turns and edits travel with the history
    assert {json.loads(line)["kind"] for line in dumped.read_text().splitlines()} == {
        "text",
        "turn",
        "edit",
    }
    run("forget", "hana", "--yes")
    assert "No user" in run("feedback", "hana", answer_id, "--rating", "1", ok=False).output


# --- the server ---------------------------------------------------------------------------

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from edge_pllm.server import ServerConfig, create_app  # noqa: E402

from .security_support import asgi_request  # noqa: E402
from .server_support import Raw, Running, free_port  # noqa: E402

MODEL = "edge-pllm/default"  # the default bundle's own LLM, as the server names it


@pytest.fixture(scope="module")
def server(shared):
    with Running(shared, ServerConfig(port=free_port())) as running:
        yield running, shared


def test_memory_and_feedback_through_the_openai_client_and_plain_http(server):
    running, pllm = server
    c = openai.OpenAI(base_url=running.url, api_key="unused", max_retries=0, timeout=120)
    user = fresh("ivy")
    pllm.add(user, ALICE)

    def ask(content: str, **extension):
        return c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": content}],
            user=user,
            max_tokens=2,
            extra_body={"edge_pllm": extension},
        )

    before = ask(QUERY, strategy="plug+rag:2").model_extra["edge_pllm"]
    assert "memory" not in before and pllm.store.answers(user) == []
    told = ask(TURN, strategy="none", remember=True)
    memory = told.model_extra["edge_pllm"]["memory"]
    assert memory["remembered"] is True
    assert pllm.store.answer(user, told.id).turn_id == memory["item_id"]  # the id the client saw
    after = ask(QUERY, strategy="plug+rag:2").model_extra["edge_pllm"]
    assert (
        memory["item_id"] in after["context_ids"] and memory["item_id"] not in before["context_ids"]
    )
    assert (
        after["soft_tokens_sha256"] and after["soft_tokens_sha256"] != before["soft_tokens_sha256"]
    )

    # A stream says what it stored in its last chunk.
    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Rye or spelt?"}],
            user=user,
            max_tokens=2,
            stream=True,
            extra_body={"edge_pllm": {"strategy": "none", "remember": True}},
        )
    )
    streamed = chunks[-1].model_extra["edge_pllm"]["memory"]
    assert (
        streamed["remembered"] and pllm.store.answer(user, chunks[0].id).request == "Rye or spelt?"
    )

    # Feedback through the official client, and through plain HTTP.
    path = f"/users/{user}/feedback"
    rated = c.post(path, body={"answer_id": told.id, "rating": 1}, cast_to=object)
    assert rated == {"user": user, "answer_id": told.id, "rating": 1, "edit_id": None}
    raw = Raw(running.url)
    edited = raw.post(path, json={"answer_id": told.id, "edit": "Rye sourdough, on Sundays."})
    assert edited.status_code == 201
    assert pllm.store.items(user, limit=1)[0].id == edited.json()["edit_id"]
    kept = pllm.store.answer(user, told.id)
    assert (kept.rating, kept.edit) == (1, "Rye sourdough, on Sundays.")

    # Bad feedback: a typed 4xx, and nothing stored.
    other = fresh("jack")
    theirs = kept_answer(pllm, other, "jack's request", "jack's answer")
    before_bad = snapshot(pllm)
    with pytest.raises(openai.NotFoundError):
        c.post(path, body={"answer_id": "chatcmpl-unknown", "rating": 1}, cast_to=object)
    with pytest.raises(openai.NotFoundError):
        c.post(path, body={"answer_id": theirs, "rating": -1}, cast_to=object)
    with pytest.raises(openai.BadRequestError):
        c.post(path, body={"answer_id": told.id, "rating": 2}, cast_to=object)
    bad = [
        ({"answer_id": theirs, "edit": "mine now"}, 404, "not_found_error", None),
        ({"answer_id": told.id, "rating": 2}, 400, "invalid_request_error", "rating"),
        ({"answer_id": told.id, "rating": True}, 400, "invalid_request_error", "rating"),
        ({"answer_id": told.id, "rating": "1"}, 400, "invalid_request_error", "rating"),
        ({"answer_id": told.id, "rating": 1, "edit": "x"}, 400, "invalid_request_error", "edit"),
        ({"answer_id": told.id}, 400, "invalid_request_error", "rating"),
        ({"answer_id": told.id, "edit": " "}, 400, "invalid_request_error", "text"),
        ({"answer_id": "a b", "rating": 1}, 400, "invalid_request_error", "answer_id"),
        ({"rating": 1}, 400, "invalid_request_error", "answer_id"),
        ({"answer_id": told.id, "rating": 1, "stars": 5}, 400, "invalid_request_error", "stars"),
    ]
    for body, status, type_, param in bad:
        reply = raw.post(path, json=body)
        assert reply.status_code == status, (body, reply.text)
        error = reply.json()["error"]
        assert error["type"] == type_ and (param is None or error["param"] == param), body
    nobody = raw.post(
        f"/users/{fresh('nobody')}/feedback", json={"answer_id": told.id, "rating": 1}
    )
    assert nobody.status_code == 404
    assert raw.post(path, content=b"{not json").status_code == 400
    assert snapshot(pllm) == before_bad


def test_a_stream_the_client_leaves_is_stopped_and_not_remembered(server):
    running, pllm = server
    user = fresh("leaver")
    body = {
        "messages": [{"role": "user", "content": "Count from one to two hundred in words."}],
        "user": user,
        "max_tokens": 256,
        "stream": True,
        "edge_pllm": {"strategy": "none", "remember": True},
    }
    conn = http.client.HTTPConnection("127.0.0.1", running.config.port, timeout=60)
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"}
    )
    reply = conn.getresponse()
    assert reply.status == 200 and reply.read(6) == b"data: "  # the first chunk came
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    # The next generation waits for the model: by then the left stream has ended.
    Raw(running.url).post(
        "/completions",
        json={"prompt": "hi", "user": user, "max_tokens": 1, "edge_pllm": {"strategy": "none"}},
    )
    assert not pllm.store.has_user(user)  # stopped before its end: nothing remembered


def test_the_server_default_and_the_request_field(shared):
    app = create_app(shared, ServerConfig(remember=True))
    user = fresh("kim")

    def chat(content: str, **extension):
        body = {
            "messages": [{"role": "user", "content": content}],
            "user": user,
            "max_tokens": 1,
            "edge_pllm": {"strategy": "none", **extension},
        }
        reply = asgi_request(app, "POST", "/v1/chat/completions", json_body=body)
        assert reply.status_code == 200, reply.text
        return reply.json()

    kept = chat("Remembered by the server's default.")
    assert kept["edge_pllm"]["memory"]["remembered"] and shared.store.answer(user, kept["id"])
    skipped = chat("Not remembered: the request says no.", remember=False)
    assert "memory" not in skipped["edge_pllm"]
    assert [i.text for i in shared.store.items(user)] == ["Remembered by the server's default."]


# --- two users at once --------------------------------------------------------------------

WORDS = st.text(alphabet="abcdefghij klmnop", min_size=1, max_size=24)


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    turns=st.lists(st.tuples(st.booleans(), WORDS, st.booleans()), min_size=2, max_size=5),
)
def test_two_users_chatting_at_once_never_share_a_turn(shared, turns):
    """Property: two users talk to one server at the same time with memory on (streaming or
    not); each one's history then holds exactly the turns they sent, no other."""
    app = create_app(shared, ServerConfig(remember=True))
    users = (fresh("left"), fresh("right"))
    sent: dict[str, list[tuple[str, bool]]] = {u: [] for u in users}
    for n, (right, words, stream) in enumerate(turns):
        sent[users[right]].append((f"{users[right]} turn {n}: {words}", stream))

    def talk(user: str) -> list[dict]:
        seen = []
        for text, stream in sent[user]:
            body = {
                "messages": [{"role": "user", "content": text}],
                "user": user,
                "max_tokens": 1,
                "stream": stream,
                "edge_pllm": {"strategy": "rag:2"},
            }
            reply = asgi_request(app, "POST", "/v1/chat/completions", json_body=body)
            assert reply.status_code == 200, reply.text
            if stream:
                events = [e for e in reply.text.split("\n\n") if e and "[DONE]" not in e]
                seen.append(json.loads(events[-1].removeprefix("data: "))["edge_pllm"])
            else:
                seen.append(reply.json()["edge_pllm"])
        return seen

    with ThreadPoolExecutor(2) as pool:
        infos = dict(zip(users, pool.map(talk, users), strict=True))
    for user in users:
        if not sent[user]:
            assert not shared.store.has_user(user)
            continue
        items = shared.store.items(user)
        assert sorted(i.text for i in items) == sorted(text for text, _ in sent[user])
        assert {i.kind for i in items} == {"turn"}
        own = {i.id for i in items}
        for info in infos[user]:
            assert info["memory"]["item_id"] in own
            assert set(info["context_ids"]) <= own  # retrieval stays within the user too
