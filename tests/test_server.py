"""The OpenAI-compatible server, driven by the official `openai` client on loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from edge_pllm import InvalidInputError, LLMConfig, PersonalLLM  # noqa: E402
from edge_pllm.server import ServerConfig, create_app  # noqa: E402

from .server_support import Raw, Running, free_port  # noqa: E402

MODEL = "edge-pllm/default"  # the default bundle's own LLM, as the server names it

ALICE = ["fix(parser): handle blank lines", "docs: explain the cache", "feat: add json flag"]
BOB = ["Apple pie needs cinnamon.", "Sourdough starter: feed twice a day.", "Jam jars low."]


@pytest.fixture
def server(default_bundle: Path, tmp_path: Path) -> Iterator[tuple[Running, PersonalLLM]]:
    pllm = PersonalLLM(default_bundle, home=tmp_path, llm_config=LLMConfig(n_ctx=1024, n_threads=2))
    pllm.add("alice", ALICE)
    pllm.add("bob", BOB)
    with Running(pllm, ServerConfig(port=free_port())) as running:
        yield running, pllm
    pllm.close()


def client(running: Running, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=running.url, api_key=key, max_retries=0, timeout=120)


def bob_asks(content: str, **extra) -> dict:
    """A chat request from bob, with `extra` fields."""
    return dict(model=MODEL, messages=[{"role": "user", "content": content}], user="bob", **extra)


def ids_of(pllm: PersonalLLM, user: str) -> set[int]:
    return {i.id for i in pllm.store.items(user)}


def test_chat_completion_personalized_by_user(server):
    running, pllm = server
    c = client(running)
    models = c.models.list()
    assert models.data[0].id.startswith("edge-pllm/")
    for user in ("alice", "bob"):
        resp = c.chat.completions.create(
            model=models.data[0].id,
            messages=[{"role": "user", "content": "Write a one-line note about the cache."}],
            user=user,
            max_tokens=8,
            extra_body={"edge_pllm": {"strategy": "recent:2"}},
        )
        assert resp.choices[0].message.content.strip()
        info = resp.model_extra["edge_pllm"]
        assert info["strategy"] == "recent" and len(info["context_ids"]) == 2
        assert set(info["context_ids"]) <= ids_of(pllm, user)  # what the runtime received
        assert resp.usage.completion_tokens > 0
    # Retrieval: the item close to the request is shown; nothing unrelated is.
    for user, request, expected in (
        ("alice", "The parser fails on blank lines: fix it.", ALICE[0]),
        ("bob", "How often do I feed the sourdough starter?", BOB[1]),
    ):
        resp = c.chat.completions.create(
            model=models.data[0].id,
            messages=[{"role": "user", "content": request}],
            user=user,
            max_tokens=4,
            extra_body={"edge_pllm": {"strategy": "rag:3"}},
        )
        info = resp.model_extra["edge_pllm"]
        shown = [i.text for i in pllm.store.items(user) if i.id in info["context_ids"]]
        assert info["strategy"] == "rag" and expected in shown
        assert "fallback" not in info


def test_streaming_equals_non_streaming(server):
    running, _ = server
    c = client(running)
    kwargs = bob_asks("Name three fruits.", max_tokens=16, temperature=0)
    whole = c.chat.completions.create(**kwargs).choices[0].message.content
    pieces = [
        ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kwargs)
    ]
    assert "".join(pieces) == whole
    text = c.completions.create(model=MODEL, prompt="Name three fruits.", user="bob", max_tokens=16)
    assert text.choices[0].text == whole  # same request as a completion, same runtime path


def test_seed_makes_a_sampled_answer_repeatable(server):
    running, _ = server
    c = client(running)
    kwargs = bob_asks("Tell me a story about a cat.", max_tokens=24, temperature=1.5)

    def sample(**extra) -> str:
        return c.chat.completions.create(**kwargs, **extra).choices[0].message.content

    first = sample(seed=7)
    assert sample(seed=7) == first  # the same seed, the same draw
    streamed = c.chat.completions.create(**kwargs, seed=7, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == first
    assert any(sample(seed=seed) != first for seed in (8, 9, 10))  # it reaches the sampler
    assert len({sample() for _ in range(3)}) > 1  # no seed: a fresh draw, as OpenAI
    with pytest.raises(openai.BadRequestError, match="seed"):
        sample(seed=-1)


def test_soft_tokens_follow_the_user_when_the_bundle_has_a_head(server):
    running, pllm = server
    if pllm.plug is None:
        pytest.skip("the default bundle carries no Persona-Plug head")
    c = client(running)
    seen = {}
    for user in ("alice", "bob"):
        resp = c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Say hi."}],
            user=user,
            max_tokens=2,
            extra_body={"edge_pllm": {"strategy": "plug"}},
        )
        seen[user] = resp.model_extra["edge_pllm"]["soft_tokens_sha256"]
    assert seen["alice"] and seen["bob"] and seen["alice"] != seen["bob"]


def test_errors_are_openai_style_and_the_server_stays_up(server):
    running, pllm = server
    c = client(running)
    # A user the store has never seen is a first conversation, not an error.
    first = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        user="nobody",
        max_tokens=4,
        extra_body={"edge_pllm": {"strategy": "rag"}},
    )
    assert first.model_extra["edge_pllm"]["fallback"] == "no history: plain prompt"
    assert first.model_extra["edge_pllm"]["context_ids"] == []
    assert not pllm.store.has_user("nobody")  # answering stores nothing
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            user="alice",
            extra_body={"edge_pllm": {"strategy": "telepathy"}},
        )
    assert "Unknown strategy" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "word " * 3000}],
            user="alice",
            max_tokens=8,
        )
    assert err.value.body["code"] == "context_length_exceeded"
    assert err.value.body["details"]["n_ctx"] == 1024
    raw = Raw(running.url, timeout=30)
    bad = raw.post(
        "/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    wrong = raw.post("/chat/completions", json={"messages": "hi", "user": "alice"})
    assert wrong.status_code == 400
    typed = raw.post(
        "/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}], "user": "alice", "max_tokens": "ten"},
    )
    assert typed.status_code == 400 and typed.json()["error"]["param"] == "max_tokens"
    huge = raw.post("/users/alice/history", content=b"x" * 2_000_000)
    assert huge.status_code == 413
    no_user = raw.post("/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert no_user.status_code == 400 and no_user.json()["error"]["param"] == "user"
    assert raw.get("/models").status_code == 200  # still up
    assert ids_of(pllm, "alice")  # nothing lost


def test_history_endpoints(server):
    running, pllm = server
    raw = Raw(running.url, timeout=60)
    added = raw.post(
        "/users/carol/history",
        json={"items": ["apple pie recipe", {"text": "tax return deadline"}]},
    )
    assert added.status_code == 201 and len(added.json()["ids"]) == 2
    assert raw.post("/users/carol/history", json={"items": ["ok", "   "]}).status_code == 400
    listed = raw.get("/users/carol/history").json()["items"]
    assert sorted(i["text"] for i in listed) == ["apple pie recipe", "tax return deadline"]
    hits = raw.get("/users/carol/search", params={"q": "baking apples", "k": 1}).json()["hits"]
    assert hits[0]["text"] == "apple pie recipe" and hits[0]["part"] is None
    assert hits[0]["passage"] == "apple pie recipe"
    note = "\n\n".join([f"Tool {i} hangs in the shed by the rakes." for i in range(40)])
    note += "\n\nThe spare house key is under the blue flower pot."
    assert raw.post("/users/dina/history", json={"items": [note]}).status_code == 201
    (hit,) = raw.get("/users/dina/search", params={"q": "spare house key", "k": 1}).json()["hits"]
    assert hit["text"] == note and hit["passage"].endswith("under the blue flower pot.")
    assert hit["part"]["number"] == hit["part"]["count"] > 1
    assert note[hit["part"]["start"] : hit["part"]["stop"]] == hit["passage"]
    exported = raw.get("/users/carol/export").text.splitlines()
    assert len(exported) == 2 and json.loads(exported[0])["text"]
    item = added.json()["ids"][0]
    assert raw.delete(f"/users/bob/history/{item}").status_code == 404  # not bob's
    assert raw.delete(f"/users/carol/history/{item}").status_code == 200
    assert raw.delete("/users/carol").json()["forgotten_items"] == 1
    assert raw.get("/users/carol/history").status_code == 404
    assert not pllm.store.has_user("carol")


def test_auth(default_bundle, tmp_path):
    pllm = PersonalLLM(default_bundle, home=tmp_path, llm_config=LLMConfig(n_ctx=512))
    with pytest.raises(InvalidInputError, match="needs an API key"):
        create_app(pllm, ServerConfig(host="0.0.0.0"))
    with Running(pllm, ServerConfig(port=free_port(), api_key="s3cret")) as running:
        with pytest.raises(openai.AuthenticationError):
            client(running, "wrong").models.list()
        assert client(running, "s3cret").models.list().data
    pllm.close()


@pytest.mark.slow
def test_concurrent_clients_each_get_their_own_history(server):
    running, pllm = server
    users = [f"user{i}" for i in range(8)]
    for i, user in enumerate(users):
        pllm.add(user, [f"note {j} of {user}: topic {i}-{j}" for j in range(5)])
    own = {u: ids_of(pllm, u) for u in users}
    latencies: list[float] = []

    def worker(user: str) -> int:
        c = client(running)
        ok = 0
        for n in range(25):
            started = time.perf_counter()
            resp = c.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"topic {n}"}],
                user=user,
                max_tokens=2,
                extra_body={"edge_pllm": {"strategy": "rag:2"}},
            )
            latencies.append(time.perf_counter() - started)
            ok += set(resp.model_extra["edge_pllm"]["context_ids"]) <= own[user]
        return ok

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, users))
    elapsed = time.perf_counter() - started
    assert results == [25] * 8
    latencies.sort()
    print(
        f"\n200 requests in {elapsed:.1f} s: {200 / elapsed:.1f} req/s, "
        f"p50 {latencies[100] * 1000:.0f} ms, p95 {latencies[190] * 1000:.0f} ms"
    )
    assert elapsed < 600


def test_an_opening_starts_the_answer_streamed_or_not_and_the_response_names_it(server):
    running, _ = server
    c = client(running)
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "The parser fails on blank lines: fix it."}],
        user="alice",
        max_tokens=8,
        temperature=0,
        extra_body={"edge_pllm": {"strategy": "none+opening"}},
    )
    resp = c.chat.completions.create(**kwargs)
    text = resp.choices[0].message.content
    assert resp.model_extra["edge_pllm"]["opening"] == "fix(parser): "
    assert text.startswith("fix(parser): ") and len(text) > len("fix(parser): ")
    pieces = [
        ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kwargs)
    ]
    assert "".join(pieces) == text
    bob = c.chat.completions.create(**{**kwargs, "user": "bob"})  # no habit: no opening
    assert "opening" not in bob.model_extra["edge_pllm"]
    assert not bob.choices[0].message.content.startswith("fix(parser)")
