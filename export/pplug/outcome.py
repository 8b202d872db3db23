"""Training on what decoding writes: sampled answers scored against the gold.

The cross-entropy on the gold answer lowers the teacher-forced loss, and three levers in a
row (more data, more task tokens, a task adapter) showed that a lower loss does not make
the answers the device writes any better (models/README.md). This term scores the
answers themselves: for each example of a step, `k` answers are sampled from the frozen
LLM with the head's soft tokens (the request's keys and values reused, as in the loss),
each is scored by ROUGE-1 F1 against the gold (`consensus.unigram_f1`, the task's metric),
and the policy gradient raises the likelihood of the answers that beat their example's
mean and lowers the others' (REINFORCE with the mean of the `k` as the baseline). Only
the head learns; sampling runs without gradient.

A sampled answer ends where the device's one-line answers end (`prompts.first_line`): at an
end-of-generation token, or at the end of the first line that holds an answer. Sampling
keeps the device's temperature (0.8, as `consensus` samples), top-k, top-p and min-p, not
its repeat penalty. The gradient is that of the untempered model's log-probability, the one
greedy decoding follows, rather than of the tempered sampler's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from edge_pllm.decoding.answers import AnswerReader
from edge_pllm.decoding.consensus import TEMPERATURE, tokens, unigram_f1
from edge_pllm.inference.llm import SamplingConfig

from .adapter import applied
from .data import Encoded
from .frozen import _batched_past, token_losses

MAX_NEW_TOKENS = 24  # a gold subject is about 12 tokens; longer samples score low anyway
MIN_P = 0.05  # llama-cpp-python's default, which the device keeps


@torch.no_grad()
def sample_answers(
    llm: nn.Module,
    prompts: Sequence[Encoded],
    prefixes: Sequence[torch.Tensor | None],
    soft: torch.Tensor,
    embed_scale: float,
    k: int,
    reader: AnswerReader,
    sampling: SamplingConfig | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> tuple[list[list[int]], torch.Tensor]:
    """`k` answers per prompt (prompt-major), each [soft][after] then tokens sampled as the
    device samples (`sampling`: temperature, top-k, top-p, and min-p; default the consensus
    samples') until the device would stop (`reader.ended`, the last token kept) or
    `max_new_tokens`; and each answer's log-probability under the untempered model (B·k,).
    Prompts whose `after` differ in length are sampled in separate groups."""
    sampling = sampling or SamplingConfig(temperature=TEMPERATURE)
    device = next(llm.parameters()).device
    rows = [i for i in range(len(prompts)) for _ in range(k)]
    answers: list[list[int]] = [[] for _ in rows]
    logp = torch.zeros(len(rows))
    for width in sorted({len(p.after) for p in prompts}):
        group = [r for r, i in enumerate(rows) if len(prompts[i].after) == width]
        ids, lp = _sample_group(
            llm, [prompts[rows[r]] for r in group], [prefixes[rows[r]] for r in group],
            soft[[rows[r] for r in group]].to(device), embed_scale, reader, sampling,
            max_new_tokens,
        )  # fmt: skip
        for r, a, v in zip(group, ids, lp, strict=True):
            answers[r], logp[r] = a, v
    return answers, logp


def _sample_group(
    llm: nn.Module,
    prompts: Sequence[Encoded],
    prefixes: Sequence[torch.Tensor | None],
    soft: torch.Tensor,
    embed_scale: float,
    reader: AnswerReader,
    sampling: SamplingConfig,
    max_new_tokens: int,
) -> tuple[list[list[int]], torch.Tensor]:
    device = soft.device
    past, mask, lengths = _batched_past(prefixes, device)
    after = torch.tensor([p.after for p in prompts], dtype=torch.long, device=device)
    x = llm.get_input_embeddings()(after)
    x = torch.cat([soft * embed_scale, x], dim=1)
    rows, width = x.shape[:2]
    positions = lengths[:, None] + torch.arange(width, device=device)[None]
    mask = torch.cat([mask, torch.ones(rows, width, dtype=torch.long, device=device)], dim=1)
    answers: list[list[int]] = [[] for _ in range(rows)]
    logp = torch.zeros(rows)
    done = torch.zeros(rows, dtype=torch.bool)
    with applied(llm, on=True):
        out = llm(
            inputs_embeds=x,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
        )
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1].float().cpu()
            picked = torch.multinomial(_sampler_probs(logits, sampling), 1)[:, 0]
            gained = torch.log_softmax(logits, dim=-1).gather(1, picked[:, None])[:, 0]
            logp += torch.where(done, 0.0, gained)
            for r in (~done).nonzero()[:, 0].tolist():
                answers[r].append(int(picked[r]))
                done[r] = reader.ended(answers[r])
            if bool(done.all()):
                break
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long, device=device)], 1)
            out = llm(
                input_ids=picked[:, None].to(device),
                attention_mask=mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
    return answers, logp


def _sampler_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The distribution the device samples from, in llama.cpp's order: top-k, top-p and
    min-p on the model's probabilities, then the temperature over what is left."""
    probs = torch.softmax(logits, dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if 0 < sampling.top_k < probs.shape[-1]:
        keep &= probs >= probs.topk(sampling.top_k, dim=-1).values[:, -1:]
    if sampling.top_p < 1.0:  # the likeliest tokens until their mass reaches top_p
        kept = torch.where(keep, probs, 0.0)
        kept = kept / kept.sum(dim=-1, keepdim=True)
        ordered, order = kept.sort(dim=-1, descending=True)
        likelier = ordered.cumsum(dim=-1) - ordered
        keep &= torch.zeros_like(keep).scatter(-1, order, likelier < sampling.top_p)
    keep &= probs >= MIN_P * probs.max(dim=-1, keepdim=True).values
    tempered = torch.where(keep, logits / max(sampling.temperature, 1e-6), -torch.inf)
    return torch.softmax(tempered, dim=-1)


def answer_scores(
    answers: Sequence[Sequence[int]], golds: Sequence[str], reader: AnswerReader
) -> torch.Tensor:
    """Each answer's ROUGE-1 F1 against its gold, as the task's scorer reads the answer."""
    return torch.tensor(
        [
            unigram_f1(Counter(tokens(reader.text(a))), Counter(tokens(g)))
            for a, g in zip(answers, golds, strict=True)
        ]
    )


def answer_log_probs(
    llm: nn.Module,
    prompts: Sequence[Encoded],
    prefixes: Sequence[torch.Tensor | None],
    soft: torch.Tensor,
    embed_scale: float,
    answers: Sequence[Sequence[int]],
) -> torch.Tensor:
    """log p(answer) through the soft tokens, teacher-forced (with gradient through `soft`),
    for answers given prompt-major, the same number for each prompt."""
    k = len(answers) // len(prompts)
    rows = [i for i in range(len(prompts)) for _ in range(k)]
    encoded = [
        Encoded(prompts[i].before, prompts[i].after, list(a))
        for i, a in zip(rows, answers, strict=True)
    ]
    losses, mask = token_losses(llm, encoded, soft[rows], embed_scale, [prefixes[i] for i in rows])
    return -(losses * mask).sum(dim=1)


def outcome_loss(logp: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The policy-gradient loss of a batch's sampled answers (prompt-major, k per prompt;
    `logp` from `answer_log_probs`), summed over the answers:
    −Σ (score − its prompt's mean score) · log p(answer)."""
    advantage = scores.view(-1, k) - scores.view(-1, k).mean(dim=1, keepdim=True)
    return -(advantage.flatten().to(logp.device) * logp).sum()
