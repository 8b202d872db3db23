"""The Persona-Plug head (torch): it turns a request and a user's history vectors into soft
tokens for the frozen LLM.

    x   = E(request)                  the input encoder, one of two variants (`input_encoder`):
                                        "linear": x = A q, q the request's embedding from the
                                          frozen encoder (the bundle's embedder), A learned
                                        "trainable" (the paper): x = normalize(pool(Enc(ids))),
                                          Enc a trainable copy of the sentence encoder
    h_i = e_i − μ                     the history's vectors (frozen, from the store), centred on
                                      the training population's mean μ with `center` (ours: the
                                      persona then says how this user differs from everyone)
    w_ki = softmax_i(τ h_i · W_k x)   one attention per persona token k (W_1 = I when K = 1);
                                      τ learned from `attention_scale` (None: τ = 1, the paper's
                                      cosines, whose softmax over hundreds of items is nearly
                                      uniform)
    P_k = Σ_i w_ki Proj(h_i)_k        Proj = Linear(d_enc→d_llm) → GELU → Linear(d_llm→K·d_llm)
    I_t = Proj_I(v_t)                 v_1..v_T: learned task vectors (T = 1: the paper's one
                                      instruction token), through their own projector
    soft tokens = [I_1..I_T; P_1..P_K], each rescaled to the mean row norm of the LLM's token
    embeddings, so they live where the LLM's input embeddings live.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from edge_pllm.errors import InvalidInputError
from edge_pllm.inference.bundle import InputEncoder
from edge_pllm.personalization.head import HISTORY_INPUTS, QUERY_INPUTS


@dataclass
class HeadConfig:
    """The head's shape. `pooling`, `normalize` and `max_seq_length` are the bundle
    embedder's settings, used by the trainable input encoder (and recorded for the device)."""

    d_enc: int
    d_llm: int
    embed_norm: float
    max_history: int = 512
    input_encoder: InputEncoder = "linear"
    n_persona: int = 1  # persona tokens (the paper: 1)
    n_task: int = 1  # task tokens, the same for everyone; the head emits n_task + n_persona
    attention_scale: float | None = None  # learned τ's start (None: the paper's, no τ)
    center: bool = False  # subtract the population mean μ from the history vectors
    placement: str = "prefix"  # where the soft tokens go: "prefix" or "before_answer"
    adapter_rank: int = 0  # the task adapter's LoRA rank (adapter.py); 0: none
    pooling: str = "mean"
    normalize: bool = True
    max_seq_length: int = 256


def check_head_settings(n_persona: int, attention_scale: float | None, n_task: int = 1) -> None:
    """Refuse a head shape that cannot be built (before anything is loaded or written)."""
    if n_persona < 1:
        raise InvalidInputError(f"n_persona must be ≥ 1 (got {n_persona}).", field="n_persona")
    if n_task < 1:
        raise InvalidInputError(f"n_task must be ≥ 1 (got {n_task}).", field="n_task")
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
    """Token states (B, L, d) -> sentence vectors (B, d), as edge_pllm.inference.embedder
    pools them."""
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
    """Input-aware aggregation of history embeddings into [task, persona] soft tokens.

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
        check_head_settings(config.n_persona, config.attention_scale, config.n_task)
        k = config.n_persona
        self.proj = nn.Sequential(nn.Linear(d_enc, d_llm), nn.GELU(), nn.Linear(d_llm, k * d_llm))
        # One attention query per persona token; each starts near x itself.
        self.query_heads: nn.Linear | None = None
        if k > 1:
            self.query_heads = nn.Linear(d_enc, k * d_enc, bias=False)
            with torch.no_grad():
                eye = torch.eye(d_enc).repeat(k, 1)
                self.query_heads.weight.copy_(eye + 0.02 * torch.randn_like(eye))
        self.instruction = nn.Parameter(torch.randn(config.n_task, d_enc) / math.sqrt(d_enc))
        self.proj_instruction = nn.Sequential(
            nn.Linear(d_enc, d_llm), nn.GELU(), nn.Linear(d_llm, d_llm)
        )
        self.register_buffer("embed_norm", torch.tensor(float(config.embed_norm)))
        # μ, set from the training histories (`set_history_mean`); zero leaves them as they are.
        self.register_buffer("history_mean", torch.zeros(d_enc))
        # The task adapter on the frozen LLM (adapter.TaskAdapter), set with `add_adapter`:
        # its shapes are the LLM's. Not part of forward (nor of the ONNX graph).
        self.adapter: nn.Module | None = None
        self.log_scale: nn.Parameter | None = None
        if config.attention_scale is not None:
            start = torch.tensor(math.log(config.attention_scale))
            self.log_scale = nn.Parameter(start)  # log: τ stays positive

    def add_adapter(self, llm: nn.Module) -> None:
        """A task adapter of `config.adapter_rank` for `llm`, attached to it (adapter.py)."""
        from .adapter import TaskAdapter

        self.adapter = TaskAdapter(TaskAdapter.shapes_of(llm), self.config.adapter_rank)
        self.adapter.attach(llm)

    def set_history_mean(self, vectors: torch.Tensor) -> None:
        """μ: the mean of the training population's history vectors (N, d_enc)."""
        with torch.no_grad():
            self.history_mean.copy_(vectors.mean(dim=0))

    @property
    def input_names(self) -> tuple[str, ...]:
        """The forward (and ONNX) inputs in order: the request's, then history and mask."""
        return (*self.query_encoder.input_names, *HISTORY_INPUTS)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The request's inputs (`input_names`: query (B, d_enc), or input_ids and
        attention_mask (B, L)), then history (B, N, d_enc) and mask (B, N) of 1/0
        -> soft tokens (B, n_task + n_persona, d_llm)."""
        *query, history, mask = inputs
        if self.config.center:
            history = history - self.history_mean
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
        task = self.proj_instruction(self.instruction).expand(persona.shape[0], -1, -1)
        tokens = torch.cat([task, persona], dim=1)
        return tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-6) * self.embed_norm
