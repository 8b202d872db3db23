"""The task adapter: a LoRA on the frozen LLM that acts only where the soft tokens act.

With the soft tokens before the answer, each example's request runs through the plain LLM
(its keys and values computed once, `frozen.FrozenPrefix`), and the soft tokens, the
answer's header and the answer run through the LLM with the adapter. The adapter learns
the task (one for all users, trained with the head), while the request's keys and values
stay those of the plain LLM: cached in training, and on the device shared by every
strategy and user. The device sets the adapter on its llama.cpp context for exactly those
positions (`edge_pllm.inference.llm`), from a GGUF LoRA file (`write_gguf`).

    y = W x + (alpha / rank) B A x      on q, k, v, o, gate, up and down of every layer
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_pllm.files import replacing

# transformers' Llama-family projections -> llama.cpp's tensor names
TARGETS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
ALPHA_PER_RANK = 2.0  # alpha = 2 × rank: the update's scale stays 2 whatever the rank


class LoRALinear(nn.Module):
    """A frozen linear layer plus the adapter's low-rank update, added while `on`."""

    def __init__(self, base: nn.Linear, a: nn.Parameter, b: nn.Parameter, scale: float):
        super().__init__()
        self.base, self.scale, self.on = base, scale, False
        # Held outside the module tree: the head owns (and saves) them, not the LLM.
        self._ab = (a, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.on:
            return y
        a, b = self._ab
        return y + (x @ a.T) @ b.T * self.scale


class TaskAdapter(nn.Module):
    """The adapter's weights, `A` (rank, in) and `B` (out, rank) for each target of each
    layer (B starts at zero: a new adapter changes nothing)."""

    def __init__(self, layer_shapes: list[dict[str, tuple[int, int]]], rank: int):
        super().__init__()
        self.rank, self.alpha = rank, ALPHA_PER_RANK * rank
        self.a, self.b = nn.ParameterDict(), nn.ParameterDict()
        for i, shapes in enumerate(layer_shapes):
            for target, (n_out, n_in) in shapes.items():
                key = _key(i, target)
                self.a[key] = nn.Parameter(torch.randn(rank, n_in) / n_in**0.5)
                self.b[key] = nn.Parameter(torch.zeros(n_out, rank))

    @staticmethod
    def shapes_of(llm: nn.Module) -> list[dict[str, tuple[int, int]]]:
        """Each layer's targets and their (out, in) shapes."""
        return [
            {t: tuple(_linear(layer, t).weight.shape) for t in TARGETS}  # type: ignore[misc]
            for layer in _layers(llm)
        ]

    def attach(self, llm: nn.Module) -> None:
        """Wrap the LLM's target layers so that `applied(llm)` adds this adapter."""
        for i, layer in enumerate(_layers(llm)):
            for target in TARGETS:
                parent, name = _parent(layer, target)
                base = getattr(parent, name)
                if isinstance(base, LoRALinear):
                    base = base.base
                key = _key(i, target)
                wrapped = LoRALinear(base, self.a[key], self.b[key], self.alpha / self.rank)
                setattr(parent, name, wrapped)

    def write_gguf(self, path: str | Path, architecture: str, n_head: int, n_head_kv: int) -> Path:
        """The adapter as a llama.cpp LoRA GGUF for a model of `architecture`. llama.cpp
        keeps q and k with their rows permuted for its rope (as its converter does), so
        their B rows are permuted alike."""
        import gguf

        path = Path(path)
        with replacing(path) as written:  # owner-only, and whole or not at all
            self._write(gguf.GGUFWriter(str(written), architecture), n_head, n_head_kv)
        return path

    def _write(self, writer: Any, n_head: int, n_head_kv: int) -> None:
        import gguf

        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(self.alpha))
        for key in self.a:
            layer, target = key.split("-", 1)
            target = target.replace("-", ".")
            a = self.a[key].detach().float().cpu().numpy()
            b = self.b[key].detach().float().cpu()
            if target == "self_attn.q_proj":
                b = _rope_permute(b, n_head)
            elif target == "self_attn.k_proj":
                b = _rope_permute(b, n_head_kv)
            name = f"blk.{layer}.{TARGETS[target]}.weight"
            writer.add_tensor(f"{name}.lora_a", a)
            writer.add_tensor(f"{name}.lora_b", b.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


@contextmanager
def applied(llm: nn.Module, on: bool = True) -> Iterator[None]:
    """Within the block, the LLM's attached adapter (if any) is added (`on`) or not."""
    wrapped = [m for m in llm.modules() if isinstance(m, LoRALinear)]
    for m in wrapped:
        m.on = on
    try:
        yield
    finally:
        for m in wrapped:
            m.on = False


def _key(layer: int, target: str) -> str:
    return f"{layer}-{target.replace('.', '-')}"  # ParameterDict keys cannot hold dots


def _layers(llm: nn.Module) -> nn.ModuleList:
    return llm.model.layers  # type: ignore[attr-defined,return-value]


def _parent(layer: nn.Module, target: str) -> tuple[nn.Module, str]:
    owner, name = target.split(".")
    return getattr(layer, owner), name


def _linear(layer: nn.Module, target: str) -> nn.Linear:
    parent, name = _parent(layer, target)
    module = getattr(parent, name)
    return module.base if isinstance(module, LoRALinear) else module


def _rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows in llama.cpp's order for q or k (convert_hf_to_gguf's `LlamaModel.permute`)."""
    shape = rows.shape
    grouped = rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
    return grouped.swapaxes(1, 2).reshape(shape)
