"""The frozen models in torch: the bundle's LLM (its GGUF dequantized: the weights the device
runs), the input encoder's source, and the teacher-forced loss of soft tokens through the LLM.

Each example is laid out as [before][soft][after][target] (`data.Encoded`). `before` never
depends on the persona: its keys and values are computed once, without gradient, and kept
in fp16 (`FrozenPrefix`); each step then runs the LLM over [soft][after][target] only, a
few dozen positions instead of a few hundred. With the soft tokens in front (`prefix`),
`before` is at most a BOS and the whole prompt is run each step, as the paper does.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from edge_pllm.errors import InvalidInputError
from edge_pllm.files import atomic_write, private_dir
from edge_pllm.inference.bundle import Bundle, sha256_file
from edge_pllm.inference.embedder import Embedder
from edge_pllm.personalization.head import QueryTokenizer

from ..embedder import quiet_third_party
from .adapter import applied
from .data import Encoded
from .model import PPlugHead


def load_frozen_llm(bundle: Bundle, source: Path | None = None) -> nn.Module:
    """The bundle's LLM in transformers: its GGUF dequantized (the weights the device runs),
    or the Hugging Face folder it was exported from."""
    from transformers import AutoModelForCausalLM

    with quiet_third_party():
        if source is not None:
            model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
        else:
            gguf = bundle.file(bundle.llm.file)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def token_embedding_norm(model: nn.Module) -> float:
    """Mean row norm of the input-embedding table, in the space the runtime feeds (unscaled)."""
    table = model.get_input_embeddings().weight.detach()
    return float(table.norm(dim=-1).mean())


def load_input_encoder(bundle: Bundle, source: Path | None = None) -> nn.Module:
    """A trainable fp32 copy of the sentence encoder the bundle's embedder was exported from:
    the sentence-transformers folder `source` (default: the one the default bundle uses).
    A folder whose tokenizer differs from the bundle's is refused (its ids would not match
    what the device feeds); `check_input_encoder` then compares the vectors themselves."""
    from transformers import AutoModel

    from ..defaults import default_embedder_source

    source = source or default_embedder_source()
    tokenizer = source / "tokenizer.json"
    wanted = bundle.manifest["files"][bundle.embedder.tokenizer]["sha256"]
    if not tokenizer.is_file() or sha256_file(tokenizer) != wanted:
        raise InvalidInputError(
            f"{source} is not the sentence encoder the bundle's embedder was exported from "
            "(its tokenizer.json differs from the bundle's); pass that folder as the encoder "
            "source (--encoder-source).",
            field="encoder_source",
        )
    with quiet_third_party():
        return AutoModel.from_pretrained(str(source), dtype=torch.float32)


def check_input_encoder(
    head: PPlugHead, tokenize: QueryTokenizer, embedder: Embedder, texts: Sequence[str]
) -> float:
    """The mean cosine between the head's (untrained) trainable encoder and the bundle's
    embedder on `texts`; refuses an encoder that is not the embedder's source (the int8
    embedder agrees with its fp32 source at cosine ≈ 0.99)."""
    encoder = head.query_encoder
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        ours = encoder(*(torch.from_numpy(a) for a in tokenize(texts))).numpy()
    encoder.train(was_training)
    theirs = embedder.embed(list(texts))
    cosine = float(np.mean(np.sum(ours * theirs, axis=1)))
    if cosine < 0.9:
        raise InvalidInputError(
            f"The trainable encoder's vectors disagree with the bundle's embedder (mean cosine "
            f"{cosine:.3f}); pass the folder it was exported from (--encoder-source).",
            field="encoder_source",
        )
    return cosine


def _layers(cache: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of each layer of a transformers cache, (1, kv_heads, L, head_dim)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[attr-defined]
    return [(k, v) for k, v in cache]  # type: ignore[attr-defined]


class FrozenPrefix:
    """Each example's `before` ids run once through the frozen LLM without gradient; their
    keys and values kept in fp16, one (layers, 2, kv_heads, L, head_dim) tensor each.

    With `cache_dir` (one folder per LLM), each prefix is also kept on disk by the hash of
    its ids and read back by a later run instead of computed (about 0.5 s of CPU each)."""

    def __init__(
        self,
        llm: nn.Module,
        encoded: Sequence[Encoded],
        progress: bool = True,
        cache_dir: Path | None = None,
    ):
        self.kv: list[torch.Tensor | None] = []
        device = next(llm.parameters()).device
        if cache_dir is not None:
            private_dir(cache_dir)  # the requests of private history: owner-only
        with torch.no_grad():
            for e in tqdm(
                encoded,
                desc="Request keys/values",
                unit="example",
                disable=not progress or not encoded,
            ):
                if not e.before:
                    self.kv.append(None)
                    continue
                path = None
                if cache_dir is not None:
                    key = hashlib.sha256(np.asarray(e.before, dtype=np.int64).tobytes())
                    path = cache_dir / f"{key.hexdigest()[:32]}.pt"
                    if path.is_file():
                        try:
                            self.kv.append(torch.load(path, weights_only=True))
                            continue
                        except Exception:  # a damaged file is computed again
                            pass
                ids = torch.tensor([e.before], dtype=torch.long, device=device)
                cache = llm(input_ids=ids, use_cache=True).past_key_values
                layers = _layers(cache)
                stacked = torch.stack([torch.stack([k[0], v[0]]) for k, v in layers])
                self.kv.append(stacked.to("cpu", torch.float16))
                if path is not None:
                    buffer = io.BytesIO()
                    torch.save(self.kv[-1], buffer)
                    atomic_write(path, buffer.getvalue())

    def __getitem__(self, index: int) -> torch.Tensor | None:
        return self.kv[index]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv if t is not None)


def _batched_past(
    kvs: Sequence[torch.Tensor | None], device: torch.device
) -> tuple[object | None, torch.Tensor, torch.Tensor]:
    """The prefixes of a batch as one cache, left-padded to the longest: (cache or None,
    mask (B, Lmax) of 1/0, lengths (B,))."""
    from transformers import DynamicCache

    lengths = torch.tensor([0 if kv is None else kv.shape[3] for kv in kvs], device=device)
    width = int(lengths.max()) if len(kvs) else 0
    mask = torch.zeros(len(kvs), width, dtype=torch.long, device=device)
    if width == 0:
        return None, mask, lengths
    shape = next(kv for kv in kvs if kv is not None).shape  # (layers, 2, heads, L, dim)
    past = torch.zeros(shape[0], 2, len(kvs), shape[2], width, shape[4], device=device)
    for b, kv in enumerate(kvs):
        if kv is not None:
            n = kv.shape[3]
            past[:, :, b, :, width - n :] = kv.to(device, torch.float32)
            mask[b, width - n :] = 1
    cache = DynamicCache()
    for layer in range(shape[0]):
        cache.update(past[layer, 0], past[layer, 1], layer)
    return cache, mask, lengths


def token_losses(
    llm: nn.Module,
    encoded: Sequence[Encoded],
    soft: torch.Tensor | None,
    embed_scale: float,
    prefixes: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced cross-entropy of each target token of [before][soft][after][target]
    (no soft tokens when `soft` is None: the plain prompt) -> (losses (B, T), mask (B, T)).
    `prefixes`: each example's `before` keys and values (FrozenPrefix); None runs `before`
    through the LLM here."""
    device = next(llm.parameters()).device
    embed = llm.get_input_embeddings()
    if prefixes is None:
        prefixes = FrozenPrefix(llm, encoded, progress=False).kv
    past, past_mask, lengths = _batched_past(prefixes, device)
    n_soft = 0 if soft is None else soft.shape[1]
    rows, labels = [], []
    for i, e in enumerate(encoded):
        ids = torch.tensor([*e.after, *e.target], dtype=torch.long, device=device)
        parts = [embed(ids)]
        if soft is not None:
            parts.insert(0, soft[i] * embed_scale)
        rows.append(torch.cat(parts, dim=0))
        labels.append([-100] * (n_soft + len(e.after)) + e.target)
    width = max(len(r) for r in rows)
    inputs = torch.zeros(len(rows), width, rows[0].shape[1], device=device)
    attention = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    label_t = torch.full((len(rows), width), -100, dtype=torch.long, device=device)
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        inputs[i, : len(r)] = r
        attention[i, : len(r)] = 1
        label_t[i, : len(lab)] = torch.tensor(lab)
    positions = lengths[:, None] + torch.arange(width, device=device)[None]
    # A task adapter acts with the soft tokens, after the request (adapter.py).
    with applied(llm, on=soft is not None):
        logits = llm(
            inputs_embeds=inputs,
            attention_mask=torch.cat([past_mask, attention], dim=1),
            position_ids=positions,
            past_key_values=past,
            use_cache=past is not None,
        ).logits[:, :-1]
    targets = label_t[:, 1:]
    losses = nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    return losses, targets != -100
