"""Registered-model helpers shared by the tests of `models add` and of the server."""

from __future__ import annotations

from pathlib import Path

from edge_pllm import LLMConfig, PersonalLLM

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "<start_of_turn>model\n{{ m['content'] | trim }}<end_of_turn>\n{% else %}"
    "<start_of_turn>user\n{{ m['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def runtime(bundle: Path, home: Path, model: str | None) -> PersonalLLM:
    config = LLMConfig(n_ctx=512, n_threads=2)
    return PersonalLLM(bundle, home=home, llm_config=config, model=model)
