"""The trained head as the device runs it: an ONNX graph, its task adapter as a GGUF LoRA,
and its manifest entry."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edge_pllm.files import atomic_write, replacing
from edge_pllm.inference.bundle import ADAPTER_FILE, HEAD_FILE, Bundle, PlugSpec, load_bundle

from ..embedder import quiet_third_party
from .config import TrainConfig
from .model import PPlugHead
from .training import TrainResult


def export_onnx(head: PPlugHead, path: str | Path) -> Path:
    """The head as ONNX: the request's inputs (`head.input_names`: query (B, d_enc) for the
    linear input encoder, input_ids and attention_mask (B, L) int64 for the trainable one),
    history (B, N, d_enc) and mask (B, N) -> soft_tokens (B, n_task + n_persona, d_llm). fp32
    throughout; the trainable variant carries its encoder (about 90 MB for MiniLM)."""
    path = Path(path)
    d = head.config.d_enc
    query = head.query_encoder.example_inputs()
    batch = len(query[0])
    args = (*query, torch.zeros(batch, 3, d), torch.ones(batch, 3))
    head.eval()
    with quiet_third_party(), torch.no_grad(), replacing(path) as written:
        torch.onnx.export(
            head,
            args,
            str(written),
            input_names=list(head.input_names),
            output_names=["soft_tokens"],
            dynamic_axes={
                **head.query_encoder.dynamic_axes(),
                "history": {0: "batch", 1: "n"},
                "mask": {0: "batch", 1: "n"},
                "soft_tokens": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    return path


def export_adapter(head: PPlugHead, path: str | Path, bundle: Bundle) -> Path | None:
    """The head's task adapter as a llama.cpp LoRA GGUF for `bundle`'s LLM (None: the head
    has none)."""
    if head.adapter is None:
        return None
    from ..bundle import gguf_fields

    field = gguf_fields(bundle.file(bundle.llm.file))
    arch = field("general.architecture")
    n_head = int(field(f"{arch}.attention.head_count"))
    # Left out by converters when it equals head_count (llama.cpp then reads it so).
    n_head_kv = int(field(f"{arch}.attention.head_count_kv") or n_head)
    return head.adapter.write_gguf(path, arch, n_head, n_head_kv)  # type: ignore[operator]


def head_spec(head: PPlugHead, bundle: Bundle, info: dict[str, Any]) -> PlugSpec:
    """The manifest's `plug` entry for `head` trained against `bundle`'s LLM and embedder:
    its shape, where its soft tokens go, and the sha256 of the files it was trained for (the
    tokenizer's too when the head tokenizes the request itself); `info` (the training
    settings and results) is kept with it."""
    files = bundle.manifest["files"]
    trainable = head.config.input_encoder == "trainable"
    extra: dict[str, Any] = {
        "n_persona": head.config.n_persona,
        "n_task": head.config.n_task,
        "inputs": list(head.input_names),
    }
    if head.adapter is not None:
        extra["adapter"] = {"rank": head.adapter.rank, "alpha": head.adapter.alpha}
    if head.log_scale is not None:  # the learned τ (it started at config.attention_scale)
        extra["attention_scale"] = round(float(head.log_scale.detach().exp()), 4)
    return PlugSpec(
        file=HEAD_FILE,
        d_enc=head.config.d_enc,
        d_llm=head.config.d_llm,
        llm_sha256=files[bundle.llm.file]["sha256"],
        embedder_sha256=files[bundle.embedder.file]["sha256"],
        n_soft=head.config.n_task + head.config.n_persona,
        max_history=head.config.max_history,
        input_encoder=head.config.input_encoder,
        max_seq_length=head.config.max_seq_length if trainable else None,
        tokenizer_sha256=files[bundle.embedder.tokenizer]["sha256"] if trainable else None,
        placement=head.config.placement,  # type: ignore[arg-type]
        extra={**extra, **info},
    )


def publish(
    head: PPlugHead,
    bundle_dir: str | Path,
    out: Path,
    *,
    task: str,
    examples: int,
    config: TrainConfig,
    result: TrainResult,
    command: str,
    world_size: int = 1,
    federation: dict[str, Any] | None = None,
    attach: bool = True,
    say: Callable[[str], None] = print,
) -> PlugSpec:
    """Export a trained head as the device runs it (`plug.onnx`, the task adapter's GGUF),
    write its manifest entry to `<out>/plug.json` (the settings, the results, `command`,
    which trains it again) and, with `attach`, put it into the bundle."""
    bundle = load_bundle(bundle_dir)
    onnx_path = export_onnx(head, out / "plug.onnx")
    adapter_path = export_adapter(head, out / ADAPTER_FILE, bundle)
    info: dict[str, Any] = {
        "task": task,
        "examples": examples,
        "config": config.record(),
        "train_seconds": round(result.seconds, 1),
        "setup_seconds": round(result.setup_seconds, 1),
        "examples_per_hour": round(result.examples_per_hour),
        "final_loss": round(result.final_loss, 4),
        **(
            {"final_rouge1": round(result.final_score, 4)} if result.final_score is not None else {}
        ),
        "device": result.device,
        "world_size": world_size,  # processes that shared each step of --batch-size examples
        **(
            {"validation": {"split": config.validate, **result.validation.as_dict()}}
            if result.validation
            else {}
        ),
        **({"federation": federation} if federation else {}),
        "command": command,
    }
    spec = head_spec(head, bundle, info)
    atomic_write(out / "plug.json", json.dumps(spec.to_manifest(), indent=2))
    say(
        f"Trained in {result.seconds:.0f} s; final loss {result.final_loss:.3f}; "
        f"head at {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB)."
    )
    if attach:
        from ..bundle import attach_head

        attach_head(bundle_dir, onnx_path, spec, adapter_path)
        say(f"Head attached to the bundle {bundle_dir}.")
    return spec
