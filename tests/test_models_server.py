"""The server with registered models: `/v1/models` lists them all, a request's `model`
picks one (one in memory at a time), an unknown one is OpenAI's 404 (real llama.cpp)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edge_pllm import PersonalLLM
from edge_pllm.inference.model_registry import add_model

from .model_support import GEMMA_TEMPLATE, runtime

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from edge_pllm.server import ServerConfig  # noqa: E402

from .server_support import Running, free_port  # noqa: E402


@pytest.fixture
def served(default_bundle, smol, gemma_file, tmp_path) -> Iterator[tuple[Running, PersonalLLM]]:
    home = tmp_path / "home"
    add_model(home, smol, "smol")
    add_model(home, gemma_file, "gemma", chat_template=GEMMA_TEMPLATE)
    pllm = runtime(default_bundle, home, None)
    pllm.add("ann", ["Parked the car on level 3, row F."])
    with Running(pllm, ServerConfig(port=free_port(), default_user="ann")) as running:
        yield running, pllm
    pllm.close()


def test_the_server_lists_every_model_and_answers_the_one_named(served):
    running, _ = served
    c = openai.OpenAI(base_url=running.url, api_key="unused", max_retries=0, timeout=120)
    listed = {m.id: m.model_extra for m in c.models.list().data}
    assert set(listed) == {"edge-pllm/default", "edge-pllm/smol", "edge-pllm/gemma"}
    assert listed["edge-pllm/smol"]["plug"] and not listed["edge-pllm/gemma"]["plug"]
    service = running.server.config.app.state.service
    ask = dict(messages=[{"role": "user", "content": "Where did I park?"}], max_tokens=3)
    rag = {"edge_pllm": {"strategy": "rag:1"}}
    for model, name in [("edge-pllm/gemma", "gemma"), ("gemma", "gemma"),
                        ("edge-pllm/default", None), ("edge-pllm/smol", "smol")]:  # fmt: skip
        reply = c.chat.completions.create(model=model, **ask, extra_body=rag)
        assert reply.model == f"edge-pllm/{name or 'default'}"
        # One model in memory at a time (--max-loaded 1): the one that answered last.
        assert [r.model for r in service._runtimes.values() if r.loaded] == [name]
    with pytest.raises(openai.NotFoundError) as caught:
        c.chat.completions.create(model="gpt-4o", **ask)
    assert caught.value.body["code"] == "model_not_found" and "gpt-4o" in str(caught.value)
    streamed = c.chat.completions.create(model="edge-pllm/gemma", **ask, stream=True)
    assert {ch.model for ch in streamed} == {"edge-pllm/gemma"}


def test_two_models_asked_at_once_never_both_load_past_the_limit(served):
    """--max-loaded 1 holds across loading: two requests for two models that are not in
    memory, sent together, load one after the other (a watcher sees at most one loaded)."""
    import threading

    running, _ = served
    service = running.server.config.app.state.service
    c = openai.OpenAI(base_url=running.url, api_key="unused", max_retries=0, timeout=120)
    ask = dict(messages=[{"role": "user", "content": "Where did I park?"}], max_tokens=4)
    most, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            most[0] = max(most[0], sum(r.loaded for r in list(service._runtimes.values())))
            stop.wait(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    replies: dict[str, str] = {}
    askers = [
        threading.Thread(
            target=lambda m=m: replies.update({m: c.chat.completions.create(model=m, **ask).model})
        )
        for m in ("edge-pllm/smol", "edge-pllm/gemma", "edge-pllm/smol", "edge-pllm/gemma")
    ]
    for t in askers:
        t.start()
    for t in askers:
        t.join()
    stop.set()
    watcher.join()
    assert replies == {"edge-pllm/smol": "edge-pllm/smol", "edge-pllm/gemma": "edge-pllm/gemma"}
    assert most[0] == 1


def test_a_model_registered_again_under_its_name_answers_with_the_new_file(
    served, gemma_file, smol
):
    """A name removed and added again for another file while the server runs: the next
    request answers with the new file, and the old runtime is let go."""
    from edge_pllm.inference.model_registry import remove_model

    running, pllm = served
    service = running.server.config.app.state.service
    c = openai.OpenAI(base_url=running.url, api_key="unused", max_retries=0, timeout=120)
    ask = dict(messages=[{"role": "user", "content": "Where did I park?"}], max_tokens=3)
    c.chat.completions.create(model="smol", **ask)
    old = service._runtimes["smol"]
    assert old.bundle.llm.file and old.loaded
    remove_model(pllm.home, "smol")
    add_model(pllm.home, gemma_file, "smol", chat_template=GEMMA_TEMPLATE)
    c.chat.completions.create(model="smol", **ask)
    new = service._runtimes["smol"]
    assert new is not old and new.loaded
    assert new.bundle.file(new.bundle.llm.file).samefile(gemma_file)
    service._generation.submit(lambda: None).result()  # after the old one's close
    assert not old.loaded and old not in pllm._family
