"""Persona-Plug on the workstation: the head (torch), trained against the frozen LLM the
device runs and exported to ONNX for onnxruntime.

Rooms:
    config    TrainConfig: every setting, which drives train-plug's options, the recorded
              reproduce command and the manifest entry
    model     the head (PPlugHead) and its shape (HeadConfig)
    data      examples from a LaMP-format task, history vectors, prompt token ids
    frozen    the frozen LLM and input encoder in torch; the teacher-forced loss, with the
              request's keys and values computed once when the soft tokens follow it
    training  set up, resume, step, save
    distributed  several processes (torchrun, accelerate launch): each its share of a step
    federated  training across devices on Flower: the client, the server, the simulation
    secure    secure aggregation (Flower's SecAgg+): the server sees only the clients' mean
    deployment the same client and server as a Flower App across machines (federation/)
    validation the held-out own-versus-other loss gap
    adapter   the task adapter: a LoRA on the frozen LLM, acting from the soft tokens on
    outcome   training on what decoding writes: sampled answers scored against the gold
    onnx      ONNX and GGUF export, the manifest entry, publishing a trained head
"""

from __future__ import annotations

import importlib
from typing import Any

# Names resolve on first use (PEP 562): `export.pplug.config`, which the CLI reads for
# train-plug's options, imports no torch, so listing the commands stays light.
_WHERE = {
    "Draw": "training",
    "Encoded": "data",
    "Example": "data",
    "FederatedConfig": "config",
    "FrozenPrefix": "frozen",
    "HeadConfig": "model",
    "PPlugHead": "model",
    "PromptEncoder": "data",
    "Session": "training",
    "TrainConfig": "config",
    "TrainResult": "training",
    "Validation": "validation",
    "VectorTable": "data",
    "World": "distributed",
    "check_head_settings": "model",
    "check_input_encoder": "frozen",
    "clip_text": "data",
    "config_from_options": "config",
    "config_options": "config",
    "device_label": "training",
    "draw_batch": "training",
    "export_adapter": "onnx",
    "export_onnx": "onnx",
    "head_spec": "onnx",
    "lamp_examples": "data",
    "outcome_loss": "outcome",
    "load_frozen_llm": "frozen",
    "load_input_encoder": "frozen",
    "publish": "onnx",
    "resolve_device": "training",
    "resume": "training",
    "retrieve": "data",
    "sample_answers": "outcome",
    "save": "training",
    "setup": "training",
    "soft_tokens": "validation",
    "task_examples": "data",
    "token_embedding_norm": "frozen",
    "token_losses": "frozen",
    "train": "training",
    "train_step": "training",
    "upgrade_state": "training",
    "validate": "validation",
    "validation_examples": "data",
    "vector_cache": "data",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
