"""Persona-Plug: the head that turns a user's history into soft tokens, trained against the
frozen LLM the device runs, and exported to ONNX for onnxruntime.

Model (PPlug, arXiv 2409.11901):
    x   = E(request)                  the input encoder, one of two variants (`input_encoder`):
                                        "linear": x = A q, q the request's embedding from the
                                          frozen encoder (the bundle's embedder), A learned
                                        "trainable" (the paper): x = normalize(pool(Enc(ids))),
                                          Enc a trainable copy of the sentence encoder the
                                          bundle's embedder was exported from
    w_i = softmax_i(h_i · x)          h_i: the user's history embeddings (frozen, from the store)
    P   = Σ_i w_i Proj(h_i)           Proj = Linear(d_enc→d_llm) → GELU → Linear(d_llm→d_llm)
    I   = Proj_I(v)                   v: a learned instruction vector, its own projector
    soft tokens = [I; P], each rescaled to the mean row norm of the LLM's token embeddings,
    so they live where the LLM's input embeddings live. The LLM input is [I; P; prompt].

    With `n_persona` = K > 1 (ours, not the paper's): K persona tokens P_1..P_K, each from its
    own attention over the history (x_k = W_k x) and its own slice of Proj's output layer
    (Linear(d_llm→K·d_llm)): more room for what the history says. K = 1 is the paper's head.

    With `attention_scale` = s (ours): w_i = softmax_i(τ h_i · x), τ learned, starting at s.
    The paper's scores start as cosines (both vectors normalized, |h_i · x| ≤ 1), so its
    softmax over a few hundred items starts close to uniform and P close to the history's
    mean, sharpening only as the input encoder learns to; τ lets the head attend to the few
    items that bear on the request from the start.

Training: LLM and history encoder frozen; cross-entropy on the gold output with teacher
forcing; AdamW with warmup and linear decay (the trainable encoder at its own, smaller
learning rate); history-dropout augmentation (copies of each example that drop a random
1–50 % of the history); optionally (`rag`) a share of the examples shown with their k
nearest history items in the prompt, as plug+rag shows them, so that combination is
trained too; resumable checkpoints.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from edge_pllm import metrics
from edge_pllm.bundle import Bundle, load_bundle, sha256_file
from edge_pllm.embedder import Embedder
from edge_pllm.errors import InvalidInputError
from edge_pllm.items import HistoryItem
from edge_pllm.lamp import TaskSpec, load_split
from edge_pllm.llm import LLM, LLMConfig
from edge_pllm.plug import (
    HEAD_FILE,
    HISTORY_INPUTS,
    QUERY_INPUTS,
    InputEncoder,
    QueryTokenizer,
)
from edge_pllm.prompts import build_messages

from .bundle import attach_head  # noqa: F401  (re-exported: the training CLI uses it)
from .embedder import quiet_third_party


@dataclass
class HeadConfig:
    """The head's shape. `pooling`, `normalize` and `max_seq_length` are the bundle
    embedder's settings, used by the trainable input encoder (and recorded for the device)."""

    d_enc: int
    d_llm: int
    embed_norm: float
    max_history: int = 512
    input_encoder: InputEncoder = "linear"
    n_persona: int = 1  # persona tokens (the paper: 1); the head emits 1 + n_persona
    attention_scale: float | None = None  # learned τ's start (None: the paper's, no τ)
    pooling: str = "mean"
    normalize: bool = True
    max_seq_length: int = 256


def check_head_settings(n_persona: int, attention_scale: float | None) -> None:
    """Refuse a head shape that cannot be built (before anything is loaded or written)."""
    if n_persona < 1:
        raise InvalidInputError(f"n_persona must be ≥ 1 (got {n_persona}).", field="n_persona")
    if attention_scale is not None and attention_scale <= 0:
        raise InvalidInputError(
            f"attention_scale must be > 0 (got {attention_scale}).", field="attention_scale"
        )


class LinearQueryEncoder(nn.Linear):
    """The cheap input encoder: x = A q, where q is the request's embedding from the frozen
    encoder (the bundle's embedder, as for the history) and A starts as the identity."""

    input_names = QUERY_INPUTS["linear"]

    def __init__(self, d_enc: int):
        super().__init__(d_enc, d_enc, bias=False)
        nn.init.eye_(self.weight)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(1, self.in_features),)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"query": {0: "batch"}}


def pool_tokens(
    hidden: torch.Tensor, mask: torch.Tensor, pooling: str, normalize: bool
) -> torch.Tensor:
    """Token states (B, L, d) -> sentence vectors (B, d), as edge_pllm.embedder pools them."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "mean":
        pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
    elif pooling == "cls":
        pooled = hidden[:, 0]
    elif pooling == "max":
        pooled = hidden.masked_fill(m <= 0, -1e9).max(dim=1).values
    else:
        raise InvalidInputError(f"Unknown pooling mode {pooling!r}.", field="pooling")
    return nn.functional.normalize(pooled, dim=-1, eps=1e-12) if normalize else pooled


class TrainableQueryEncoder(nn.Module):
    """The paper's input encoder: a trainable copy of the sentence encoder (a transformers
    model), pooled and normalized as the bundle's embedder does; reads token ids."""

    input_names = QUERY_INPUTS["trainable"]

    def __init__(self, encoder: nn.Module, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        self.encoder, self.pooling, self.normalize = encoder, pooling, normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask (B, L) int64 -> x (B, d_enc)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        return pool_tokens(hidden, attention_mask, self.pooling, self.normalize)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        # Two rows, one padded: the traced graph must not assume an all-ones mask.
        mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
        return torch.tensor([[1, 2, 3, 4], [1, 2, 4, 0]]), mask

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {0: "batch", 1: "tokens"} for name in self.input_names}


class PPlugHead(nn.Module):
    """Input-aware aggregation of history embeddings into [instruction, persona] soft tokens.

    `encoder` (a transformers model, e.g. from `load_input_encoder`) is required by, and only
    used by, the `trainable` input encoder."""

    def __init__(self, config: HeadConfig, encoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        d_enc, d_llm = config.d_enc, config.d_llm
        self.query_encoder: LinearQueryEncoder | TrainableQueryEncoder
        if config.input_encoder == "linear":
            self.query_encoder = LinearQueryEncoder(d_enc)
        elif config.input_encoder == "trainable":
            if encoder is None:
                raise InvalidInputError(
                    "The trainable input encoder needs the sentence encoder to copy.",
                    field="input_encoder",
                )
            self.query_encoder = TrainableQueryEncoder(encoder, config.pooling, config.normalize)
        else:
            raise InvalidInputError(
                f"Unknown input encoder {config.input_encoder!r} "
                f"(known: {', '.join(QUERY_INPUTS)}).",
                field="input_encoder",
            )
        check_head_settings(config.n_persona, config.attention_scale)
        k = config.n_persona
        self.proj = nn.Sequential(nn.Linear(d_enc, d_llm), nn.GELU(), nn.Linear(d_llm, k * d_llm))
        # One attention query per persona token; each starts near x itself.
        self.query_heads: nn.Linear | None = None
        if k > 1:
            self.query_heads = nn.Linear(d_enc, k * d_enc, bias=False)
            with torch.no_grad():
                eye = torch.eye(d_enc).repeat(k, 1)
                self.query_heads.weight.copy_(eye + 0.02 * torch.randn_like(eye))
        self.instruction = nn.Parameter(torch.randn(d_enc) / math.sqrt(d_enc))
        self.proj_instruction = nn.Sequential(
            nn.Linear(d_enc, d_llm), nn.GELU(), nn.Linear(d_llm, d_llm)
        )
        self.register_buffer("embed_norm", torch.tensor(float(config.embed_norm)))
        self.log_scale: nn.Parameter | None = None
        if config.attention_scale is not None:
            start = torch.tensor(math.log(config.attention_scale))
            self.log_scale = nn.Parameter(start)  # log: τ stays positive

    @property
    def input_names(self) -> tuple[str, ...]:
        """The forward (and ONNX) inputs in order: the request's, then history and mask."""
        return (*self.query_encoder.input_names, *HISTORY_INPUTS)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The request's inputs (`input_names`: query (B, d_enc), or input_ids and
        attention_mask (B, L)), then history (B, N, d_enc) and mask (B, N) of 1/0
        -> soft tokens (B, 1 + n_persona, d_llm)."""
        *query, history, mask = inputs
        x = self.query_encoder(*query)
        k, d_llm = self.config.n_persona, self.config.d_llm
        if self.query_heads is None:
            xs = x.unsqueeze(1)
        else:
            xs = self.query_heads(x).unflatten(-1, (k, self.config.d_enc))
        scores = torch.einsum("bnd,bkd->bkn", history, xs)
        if self.log_scale is not None:
            scores = scores * self.log_scale.exp()
        scores = scores.masked_fill(mask.unsqueeze(1) <= 0, -1e9)
        weights = torch.softmax(scores, dim=-1)
        projected = self.proj(history).unflatten(-1, (k, d_llm))
        persona = torch.einsum("bkn,bnkd->bkd", weights, projected)
        instruction = self.proj_instruction(self.instruction).expand_as(persona[:, :1])
        tokens = torch.cat([instruction, persona], dim=1)
        return tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-6) * self.embed_norm


# --- data -------------------------------------------------------------------------------------


@dataclass
class Example:
    user: str
    query: str  # the request as the runtime passes it to the strategy
    history: list[HistoryItem]  # the user's earlier items, oldest first
    target: str

    @classmethod
    def of_texts(cls, user: str, query: str, texts: Sequence[str], target: str) -> Example:
        """An example whose history is plain texts (no task fields), oldest first."""
        history = [HistoryItem(n, user, "text", t, "", "", {}, "") for n, t in enumerate(texts)]
        return cls(user, query, history, target)

    @property
    def texts(self) -> list[str]:
        """The history's texts (what the device embeds and stores)."""
        return [item.text for item in self.history]


def clip_text(text: str, max_chars: int | None) -> str:
    """`text` cut to `max_chars` at a word boundary where there is one (None: as is)."""
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip()


def lamp_examples(
    task_dir: Path,
    split: str,
    spec: TaskSpec,
    from_profiles: int = 20,
    limit: int | None = None,
    max_query_chars: int | None = 600,
) -> list[Example]:
    """The split's questions, and one example for each of the `from_profiles` most recent
    profile items whose output is known, with only the *earlier* items of that profile as
    history: never the future.

    Each request's document is cut to `max_query_chars` (its start: the body's first lines
    say most about the subject), which bounds the prompt the frozen LLM is trained through."""
    task = load_split(task_dir, split, spec.name)
    out = []
    for q in task.questions(limit):
        entries = [p for p in q.profile if p.get(spec.input_field)]
        entries.sort(key=lambda p: str(p.get("date", "")))
        items = [
            HistoryItem(n, q.id, new.kind, new.text, new.created_at or "", "", new.metadata, "")
            for n, new in enumerate(spec.profile_items(entries))
        ]
        if q.id in task.golds and items:
            query = spec.query(clip_text(q.input, max_query_chars))
            out.append(Example(q.id, query, items, task.golds[q.id]))
        if not from_profiles or not spec.output_field:
            continue
        prefix = q.input.split(":", 1)[0] + ": " if ":" in q.input else ""
        for j in range(max(1, len(items) - from_profiles), len(items)):
            gold = entries[j].get(spec.output_field)
            if gold:
                document = clip_text(prefix + str(entries[j][spec.input_field]), max_query_chars)
                out.append(Example(q.id, spec.query(document), items[:j], str(gold)))
    return out


class VectorTable:
    """Embeddings of every distinct text, computed once with the bundle's (device) embedder.

    Batched (16 at a time) for speed: with the int8 model a vector then differs slightly from
    the one the device stores (cosine ≈ 0.99, see embedder.py), a small noise the head
    is trained under rather than a difference it could learn.

    With `cache` (an .npz file for this embedder: see `vector_cache_path`), vectors of texts
    embedded by an earlier run are read from it and the new ones added to it; an unreadable
    cache is rebuilt. A cached text keeps the vector of the batch it was first embedded in,
    so two runs' vectors of a text can differ by that int8 batch noise when only one of
    them found it cached."""

    def __init__(
        self,
        embedder: Embedder,
        texts: Sequence[str],
        progress: bool = True,
        cache: Path | None = None,
    ):
        unique = list(dict.fromkeys(texts))
        self.index = {t: i for i, t in enumerate(unique)}
        keys = [hashlib.blake2b(t.encode(), digest_size=16).hexdigest() for t in unique]
        known = _read_vectors(cache) if cache else {}
        missing = [i for i, k in enumerate(keys) if k not in known]
        self.matrix = np.zeros((len(unique), embedder.dim), dtype=np.float32)
        for i, k in enumerate(keys):
            if k in known:
                self.matrix[i] = known[k]
        bar = tqdm(
            total=len(missing), desc="Embedding", unit="text", disable=not progress or not missing
        )
        with bar:
            new = embedder.embed([unique[i] for i in missing], progress=bar.update, batch_size=16)
        self.matrix[missing] = new
        if cache and missing:
            known.update((keys[i], v) for i, v in zip(missing, new, strict=True))
            _write_vectors(cache, known)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.matrix[[self.index[t] for t in texts]]


def vector_cache_path(home_dir: Path, bundle: Bundle) -> Path:
    """Where training caches history vectors for the bundle's embedder: one file per
    embedder model, tokenizer and pooling, so bundles that share all three share it."""
    files, emb = bundle.manifest["files"], bundle.embedder
    what = [files[emb.file]["sha256"], files[emb.tokenizer]["sha256"]]
    what += [emb.config.pooling, str(emb.config.normalize), str(emb.config.max_seq_length)]
    key = hashlib.sha256("\n".join(what).encode()).hexdigest()[:16]
    return home_dir / "cache" / f"vectors-{key}.npz"


def _read_vectors(path: Path) -> dict[str, np.ndarray]:
    """The cache's vectors by text key; {} when it is missing or unreadable (a damaged or
    truncated file is rebuilt, not trusted)."""
    try:
        with np.load(path) as data:
            return dict(zip(data["keys"].tolist(), data["vectors"], strict=True))
    except Exception:  # numpy and zipfile raise many kinds for a damaged file
        return {}


def _write_vectors(path: Path, vectors: dict[str, np.ndarray]) -> None:
    """Merge `vectors` into the cache file: re-read just before writing, so a concurrent
    run's additions are kept, and replaced atomically from a temporary file of this
    process's own. A cache that cannot be written is a warning, not a failed training."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read_vectors(path), **vectors}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                keys, rows = np.array(list(merged)), np.stack(list(merged.values()))
                np.savez(f, keys=keys, vectors=rows)
            os.replace(tmp, path)  # a reader never sees half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        warnings.warn(
            f"Could not write the vector cache {path} ({e}); training goes on.", stacklevel=3
        )


# --- the frozen LLM in torch ------------------------------------------------------------------


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


def load_input_encoder(bundle: Bundle, source: Path | None = None) -> nn.Module:
    """A trainable fp32 copy of the sentence encoder the bundle's embedder was exported from:
    the sentence-transformers folder `source` (default: the one the default bundle uses).
    A folder whose tokenizer differs from the bundle's is refused (its ids would not match
    what the device feeds); `check_input_encoder` then compares the vectors themselves."""
    from transformers import AutoModel

    from edge_pllm.defaults import default_embedder_source

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


def token_embedding_norm(model: nn.Module) -> float:
    """Mean row norm of the input-embedding table, in the space the runtime feeds (unscaled)."""
    table = model.get_input_embeddings().weight.detach()
    return float(table.norm(dim=-1).mean())


@dataclass
class Encoded:
    head_ids: list[int]  # tokens before the soft tokens (a BOS, if the model adds one)
    prompt_ids: list[int]
    target_ids: list[int]


class PromptEncoder:
    """Token ids exactly as the runtime makes them (llama.cpp's tokenizer and chat template)."""

    def __init__(self, runtime_llm: LLM, spec: TaskSpec, max_prompt_tokens: int):
        self.llm, self.spec, self.max_prompt_tokens = runtime_llm, spec, max_prompt_tokens
        llama = runtime_llm.llama
        self.bos = llama.token_bos()
        self.adds_bos = llama._model.add_bos_token()
        self.eos = llama.token_eos()

    def __call__(self, example: Example, context: Sequence[HistoryItem] = ()) -> Encoded:
        """`example` as the runtime prompts it, with `context` (retrieved items) shown."""
        prompt = self.llm.apply_chat_template(
            build_messages(example.query, context, None, self.spec.style)
        )
        ids = self.llm.tokenize(prompt)
        head = ids[:1] if self.adds_bos and ids and ids[0] == self.bos else []
        rest = ids[len(head) :]
        # Rarely needed (requests are clipped, shown items capped by the task): keep the
        # end, it holds the turn markers.
        if len(rest) > self.max_prompt_tokens:
            rest = rest[-self.max_prompt_tokens :]
        target = self.llm.llama.tokenize(example.target.encode(), add_bos=False, special=False)
        return Encoded(head, rest, [*target, self.eos])


# --- training ---------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    steps: int = 400
    batch_size: int = 4
    lr: float = 1e-3
    encoder_lr: float = 1e-4  # the trainable input encoder's (pretrained weights: smaller)
    input_encoder: InputEncoder = "linear"
    weight_decay: float = 1e-4
    warmup: float = 0.05
    dropout_copies: int = 10  # history-dropout copies per example (paper: 10)
    max_history: int = 512
    max_prompt_tokens: int = 448
    n_persona: int = 1  # persona tokens (HeadConfig.n_persona)
    attention_scale: float | None = None  # HeadConfig.attention_scale
    rag: int = 0  # retrieved items shown in the prompt, as plug+rag:k does at run time
    rag_fraction: float = 0.5  # share of steps' examples trained with them (the rest: plug)
    seed: int = 0
    checkpoint_every: int = 50
    threads: int = 0
    device: str = "auto"  # "auto": a CUDA GPU when torch sees one, else the CPU


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    device: str = ""  # what the steps of this run ran on (device_label)
    validation: Validation | None = None


@dataclass
class Validation:
    """Teacher-forced loss on held-out examples, nats per target token (the mean over
    examples of each one's mean): the plain prompt (`none`), the soft tokens of the user's
    own history (`plug`), and of the next example's user's history (`plug_other`, as the
    eval's `plug@other` pairs them). `gap` = plug_other − plug with a paired bootstrap 95 %
    interval: above zero when the user's own history is what lowers the loss."""

    examples: int
    none: float
    plug: float
    plug_other: float
    gap: metrics.Estimate

    def as_dict(self) -> dict[str, Any]:
        """For the head's manifest entry (rounded)."""
        return {
            "examples": self.examples,
            "loss_none": round(self.none, 4),
            "loss_plug": round(self.plug, 4),
            "loss_plug_other": round(self.plug_other, 4),
            "gap": [round(v, 4) for v in (self.gap.value, self.gap.low, self.gap.high)],
        }

    def summary(self) -> str:
        """One line for the log."""
        g = self.gap
        return (
            f"validation loss on {self.examples} examples: none {self.none:.3f}, plug "
            f"{self.plug:.3f}, plug@other {self.plug_other:.3f} (own history better by "
            f"{g.value:+.4f} [{g.low:+.4f}, {g.high:+.4f}] nats/token)"
        )


def resolve_device(name: str) -> torch.device:
    """The torch device to train on: "auto" picks a CUDA GPU when torch sees one, else the
    CPU; a device torch cannot use here is refused with what to do instead."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidInputError(
            f"Unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps.", field="device"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count or (device.index is not None and device.index >= count):
            raise InvalidInputError(
                f"Device {name!r} is not available: torch sees {count} CUDA GPU(s) "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
                "Install a CUDA build of torch on a GPU machine, or train with --device cpu.",
                field="device",
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError(
            "Device 'mps' is not available: torch sees no Apple GPU. Train with --device cpu.",
            field="device",
        )
    elif device.type not in ("cpu", "mps"):
        raise InvalidInputError(
            f"Training on {device.type!r} is not supported: use auto, cpu, cuda, cuda:N or mps.",
            field="device",
        )
    return device


def device_label(device: torch.device) -> str:
    """How the device is recorded with a trained head, e.g. "cuda (NVIDIA H100 80GB HBM3)"."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        return "mps (Apple GPU)"
    return f"cpu ({torch.get_num_threads()} threads)"


def retrieve(example: Example, table: VectorTable, k: int) -> list[HistoryItem]:
    """The `k` history items nearest the request (cosine, nearest first): what the store's
    search gives plug+rag:k at run time."""
    if not example.history or k < 1:
        return []
    scores = table(example.texts) @ table([example.query])[0]
    order = np.argsort(-scores, kind="stable")[:k]
    return [example.history[i] for i in order]


def _soft_tokens(
    head: PPlugHead, query: tuple[torch.Tensor, ...], histories: list[np.ndarray]
) -> torch.Tensor:
    """The head's soft tokens (B, 1 + n_persona, d_llm) for a batch: `query` is its request inputs
    (see PPlugHead.input_names), `histories` each user's history vectors, padded and masked."""
    n_hist = max(len(h) for h in histories)
    hist = np.zeros((len(histories), n_hist, head.config.d_enc), dtype=np.float32)
    mask = np.zeros((len(histories), n_hist), dtype=np.float32)
    for i, h in enumerate(histories):
        hist[i, : len(h)] = h
        mask[i, : len(h)] = 1
    device = head.embed_norm.device
    return head(*query, torch.from_numpy(hist).to(device), torch.from_numpy(mask).to(device))


def _token_losses(
    llm: nn.Module, encoded: list[Encoded], soft: torch.Tensor | None, embed_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced cross-entropy of each target token: [head ids][soft][prompt][target]
    (no soft tokens when `soft` is None: the plain prompt) -> (losses (B, T), mask (B, T))."""
    device = next(llm.parameters()).device
    embed = llm.get_input_embeddings()
    n_soft = 0 if soft is None else soft.shape[1]
    rows, labels = [], []
    for i, e in enumerate(encoded):
        ids_before = torch.tensor(e.head_ids, dtype=torch.long, device=device)
        ids_after = torch.tensor([*e.prompt_ids, *e.target_ids], dtype=torch.long, device=device)
        parts = [embed(ids_before), embed(ids_after)]
        if soft is not None:
            parts.insert(1, soft[i] * embed_scale)
        rows.append(torch.cat(parts, dim=0))
        n_ignore = len(e.head_ids) + n_soft + len(e.prompt_ids)
        labels.append([-100] * n_ignore + e.target_ids)
    width = max(len(r) for r in rows)
    inputs = torch.zeros(len(rows), width, rows[0].shape[1], device=device)
    attention = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    label_t = torch.full((len(rows), width), -100, dtype=torch.long, device=device)
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        inputs[i, : len(r)] = r
        attention[i, : len(r)] = 1
        label_t[i, : len(lab)] = torch.tensor(lab)
    logits = llm(inputs_embeds=inputs, attention_mask=attention).logits[:, :-1]
    targets = label_t[:, 1:]
    losses = nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    return losses, targets != -100


def _batch(
    head: PPlugHead,
    llm: nn.Module,
    encoded: list[Encoded],
    query: tuple[torch.Tensor, ...],
    histories: list[np.ndarray],
    embed_scale: float,
) -> torch.Tensor:
    """The teacher-forced loss of a batch: [head ids][I; P][prompt][target] -> CE on target,
    the mean over the batch's target tokens."""
    losses, mask = _token_losses(llm, encoded, _soft_tokens(head, query, histories), embed_scale)
    return losses.sum() / mask.sum()


def validate(
    head: PPlugHead,
    llm: nn.Module,
    examples: Sequence[Example],
    encode: PromptEncoder,
    vectors: Callable[[Sequence[str]], np.ndarray],
    query_inputs: Callable[[list[str]], tuple[torch.Tensor, ...]],
    embed_scale: float,
    batch_size: int = 8,
) -> Validation:
    """The held-out losses of `examples` (those with a history; at least two) without soft
    tokens, with the user's own history, and with the next example's user's history."""
    examples = validation_examples(examples)
    own = [vectors(e.texts[-head.config.max_history :]) for e in examples]
    other = own[1:] + own[:1]
    rows: dict[str, list[float]] = {"none": [], "plug": [], "plug_other": []}
    was_training = head.training
    head.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(examples), batch_size):
                chunk = examples[b : b + batch_size]
                encoded = [encode(e) for e in chunk]
                query = query_inputs([e.query for e in chunk])
                for name, histories in (("none", None), ("plug", own), ("plug_other", other)):
                    soft = (
                        None
                        if histories is None
                        else _soft_tokens(head, query, histories[b : b + batch_size])
                    )
                    losses, mask = _token_losses(llm, encoded, soft, embed_scale)
                    rows[name] += (losses.sum(1) / mask.sum(1)).tolist()
    finally:
        head.train(was_training)
    table = {k: np.array(v)[:, None] for k, v in rows.items()}
    spec = metrics.mean_of("loss", higher_is_better=False)
    gap = metrics.paired_difference(spec, table["plug_other"], table["plug"])["loss"]
    return Validation(
        len(examples), *(float(table[k].mean()) for k in ("none", "plug", "plug_other")), gap
    )


def validation_examples(examples: Sequence[Example]) -> list[Example]:
    """The examples validation can use (those with a history); at least two are needed."""
    usable = [e for e in examples if e.history]
    if len(usable) < 2:
        raise InvalidInputError(
            f"Validation needs at least two examples with a history (got {len(usable)}): one "
            "user's history is the next one's @other. Validate on a split with answered "
            "questions, or a larger --validate-limit.",
            field="validation",
        )
    return usable


def _optimizer(head: PPlugHead, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the head; a trainable input encoder in its own group at `encoder_lr`."""
    encoder = list(head.query_encoder.parameters())
    if head.config.input_encoder != "trainable":
        encoder = []
    in_encoder = {id(p) for p in encoder}
    groups: list[dict[str, Any]] = [
        {"params": [p for p in head.parameters() if id(p) not in in_encoder]}
    ]
    if encoder:
        groups.append({"params": encoder, "lr": config.encoder_lr})
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def train(
    bundle_dir: str | Path,
    examples: list[Example],
    spec: TaskSpec,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    llm_source: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    encoder_source: str | Path | None = None,
    validation: Sequence[Example] = (),
    vector_cache: Path | None = None,
) -> tuple[PPlugHead, TrainResult]:
    """Train a head for the bundle's LLM and embedder on `examples`; resumes from out_dir
    (a checkpoint there must be of the same head configuration, from any device).
    Trains on `config.device` (default: a CUDA GPU when there is one); the head returned
    is on the CPU.

    With `config.input_encoder == "trainable"`, the input encoder is a copy of the sentence
    encoder in `encoder_source` (default: the default bundle's), fine-tuned at
    `config.encoder_lr`.

    With `validation` examples (held out: another split), the trained head's held-out losses
    are measured (`validate`) and returned in the result. `vector_cache`: see VectorTable.
    """
    config = config or TrainConfig()
    if not examples:
        raise InvalidInputError("No training examples: check the task folder and split.")
    if config.input_encoder not in QUERY_INPUTS:
        raise InvalidInputError(
            f"Unknown input encoder {config.input_encoder!r} (known: {', '.join(QUERY_INPUTS)}).",
            field="input_encoder",
        )
    if config.rag < 0 or not 0 <= config.rag_fraction <= 1:
        raise InvalidInputError(
            f"rag must be ≥ 0 and rag_fraction within [0, 1] (got {config.rag}, "
            f"{config.rag_fraction}).",
            field="rag",
        )
    check_head_settings(config.n_persona, config.attention_scale)
    if validation:
        validation = validation_examples(validation)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(bundle_dir)
    spec_emb = bundle.embedder
    embedder = Embedder(
        bundle.file(spec_emb.file), bundle.file(spec_emb.tokenizer), spec_emb.config
    )
    runtime = LLM(bundle.file(bundle.llm.file), LLMConfig(n_ctx=512))
    llm = load_frozen_llm(bundle, Path(llm_source) if llm_source else None)
    # Measured on the CPU before the move: the same float whatever the training device.
    embed_norm = token_embedding_norm(llm) / runtime.embed_scale
    llm.to(device)
    head_config = HeadConfig(
        d_enc=spec_emb.config.dim,
        d_llm=runtime.n_embd,
        embed_norm=embed_norm,
        max_history=config.max_history,
        input_encoder=config.input_encoder,
        n_persona=config.n_persona,
        attention_scale=config.attention_scale,
        pooling=spec_emb.config.pooling,
        normalize=spec_emb.config.normalize,
        max_seq_length=spec_emb.config.max_seq_length,
    )
    trainable = config.input_encoder == "trainable"
    # The history always goes through the frozen device embedder; the request too, unless
    # the head encodes it itself from token ids.
    # Retrieval (config.rag) searches the whole history, as the store does at run time.
    first = 0 if config.rag else -config.max_history
    texts = [t for e in [*examples, *validation] for t in e.texts[first:]]
    if not trainable or config.rag:
        texts += [e.query for e in [*examples, *validation]]
    table = VectorTable(embedder, texts, progress, vector_cache)
    encode = PromptEncoder(runtime, spec, config.max_prompt_tokens)
    encoded = [encode(e) for e in examples]
    # plug+rag: the same examples with their k nearest history items shown in the prompt.
    encoded_rag = (
        [encode(e, retrieve(e, table, config.rag)) for e in examples] if config.rag else []
    )

    torch.manual_seed(config.seed)
    if trainable:
        source = Path(encoder_source) if encoder_source else None
        head = PPlugHead(head_config, load_input_encoder(bundle, source))
        tokenize = QueryTokenizer(bundle.file(spec_emb.tokenizer), head_config.max_seq_length)
        cosine = check_input_encoder(head, tokenize, embedder, [e.query for e in examples[:8]])
        if log:
            log(f"trainable input encoder agrees with the bundle's embedder: cosine {cosine:.3f}")

        def query_inputs(queries: list[str]) -> tuple[torch.Tensor, ...]:
            return tuple(torch.from_numpy(a).to(device) for a in tokenize(queries))
    else:
        head = PPlugHead(head_config)

        def query_inputs(queries: list[str]) -> tuple[torch.Tensor, ...]:
            return (torch.from_numpy(table(queries)).to(device),)

    head.to(device)
    opt = _optimizer(head, config)
    params = [p for group in opt.param_groups for p in group["params"]]
    warm = max(1, int(config.warmup * config.steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (config.steps - step) / max(1, config.steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ckpt = out_dir / "checkpoint.pt"
    start, losses, elapsed = 0, [], 0.0
    if ckpt.is_file():
        # A checkpoint resumes on any device (load_state_dict moves the tensors).
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        saved = HeadConfig(**state.get("head_config", {}))
        same_norm = math.isclose(saved.embed_norm, head_config.embed_norm, rel_tol=1e-5)
        if not same_norm or replace(saved, embed_norm=head_config.embed_norm) != head_config:
            raise InvalidInputError(
                f"The checkpoint in {out_dir} is of another head ({saved}, now "
                f"{head_config}); train into another folder or delete {ckpt.name}.",
                field="out_dir",
            )
        head.load_state_dict(_upgrade_state(state["head"]))
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, losses, elapsed = state["step"], state["losses"], state["seconds"]
        random.setstate(state["py_rng"])
        # The trainable encoder's dropout draws from torch's generator (CUDA's on a GPU).
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    else:
        random.seed(config.seed)

    # Each example once as is, plus `dropout_copies` copies with 1-50 % of history dropped.
    def sample_history(hist: list[str]) -> list[str]:
        hist = hist[-config.max_history :]
        if random.random() < config.dropout_copies / (config.dropout_copies + 1) and len(hist) > 1:
            keep = max(1, round(len(hist) * (1 - random.uniform(0.01, 0.5))))
            chosen = sorted(random.sample(range(len(hist)), keep))
            hist = [hist[i] for i in chosen]
        return hist

    bar = tqdm(
        total=config.steps,
        initial=start,
        desc="Training PPlug head",
        unit="step",
        disable=not progress,
    )
    started = time.perf_counter()
    head.train()
    with bar:
        for step in range(start, config.steps):
            idx = [random.randrange(len(examples)) for _ in range(config.batch_size)]
            hists = [table(sample_history(examples[i].texts)) for i in idx]
            query = query_inputs([examples[i].query for i in idx])
            with_rag = [bool(encoded_rag) and random.random() < config.rag_fraction for _ in idx]
            prompts = [
                encoded_rag[i] if r else encoded[i] for i, r in zip(idx, with_rag, strict=True)
            ]
            loss = _batch(head, llm, prompts, query, hists, runtime.embed_scale)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            bar.update()
            done = step + 1
            if done % config.checkpoint_every == 0 or done == config.steps:
                seconds = elapsed + time.perf_counter() - started
                torch.save(
                    {
                        "head": head.state_dict(),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "step": done,
                        "losses": losses,
                        "seconds": seconds,
                        "py_rng": random.getstate(),
                        "torch_rng": torch.get_rng_state(),
                        **(
                            {"cuda_rng": torch.cuda.get_rng_state(device)}
                            if device.type == "cuda"
                            else {}
                        ),
                        "head_config": asdict(head_config),
                    },
                    ckpt,
                )
    seconds = elapsed + time.perf_counter() - started
    checked = None
    if validation:
        checked = validate(head, llm, validation, encode, table, query_inputs, runtime.embed_scale)
        if log:
            log(checked.summary())
    head.eval().cpu()  # exported and compared on the CPU, as the device runs it
    result = TrainResult(
        config.steps,
        seconds,
        float(np.mean(losses[-20:])) if losses else 0.0,
        losses,
        device_label(device),
        checked,
    )
    if log:
        log(f"trained {config.steps} steps in {seconds:.0f} s, final loss {result.final_loss:.3f}")
    return head, result


# --- export -----------------------------------------------------------------------------------


def _upgrade_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A head state dict from before the input-encoder option (`query_map` -> linear)."""
    return {k.replace("query_map.", "query_encoder.", 1): v for k, v in state.items()}


def export_onnx(head: PPlugHead, path: str | Path) -> Path:
    """The head as ONNX: the request's inputs (`head.input_names`: query (B, d_enc) for the
    linear input encoder, input_ids and attention_mask (B, L) int64 for the trainable one),
    history (B, N, d_enc) and mask (B, N) -> soft_tokens (B, 1 + n_persona, d_llm). fp32
    throughout; the trainable variant carries its encoder (about 90 MB for MiniLM)."""
    path = Path(path)
    d = head.config.d_enc
    query = head.query_encoder.example_inputs()
    batch = len(query[0])
    args = (*query, torch.zeros(batch, 3, d), torch.ones(batch, 3))
    head.eval()
    with quiet_third_party(), torch.no_grad():
        torch.onnx.export(
            head,
            args,
            str(path),
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


def head_spec(head: PPlugHead, bundle: Bundle, info: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `plug` entry for `head` trained against `bundle`'s LLM and embedder:
    the input-encoder variant and the ONNX input names, and the sha256 of the files it was
    trained for (the tokenizer's too when the head tokenizes the request itself)."""
    files = bundle.manifest["files"]
    spec: dict[str, Any] = {
        "file": HEAD_FILE,
        "n_soft": 1 + head.config.n_persona,
        "n_persona": head.config.n_persona,
        "d_enc": head.config.d_enc,
        "d_llm": head.config.d_llm,
        "max_history": head.config.max_history,
        "input_encoder": head.config.input_encoder,
        "inputs": list(head.input_names),
        "llm_sha256": files[bundle.llm.file]["sha256"],
        "embedder_sha256": files[bundle.embedder.file]["sha256"],
    }
    if head.log_scale is not None:  # the learned τ (it started at config.attention_scale)
        spec["attention_scale"] = round(float(head.log_scale.detach().exp()), 4)
    if head.config.input_encoder == "trainable":
        spec["tokenizer_sha256"] = files[bundle.embedder.tokenizer]["sha256"]
        spec["max_seq_length"] = head.config.max_seq_length
    return {**spec, **info}
