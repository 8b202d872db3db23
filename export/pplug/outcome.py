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

A sampled answer ends where the device's one-line answers end: at the end of sequence or
at the first token that holds a line break.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import nn

from edge_pllm.consensus import tokens, unigram_f1
from edge_pllm.llm import LLM

from .adapter import applied
from .data import Encoded
from .frozen import _batched_past, token_losses

TEMPERATURE = 0.8  # the consensus candidates' temperature: the answers the device samples
MAX_NEW_TOKENS = 24  # a gold subject is about 12 tokens; longer samples score low anyway


def stop_tokens(runtime_llm: LLM) -> frozenset[int]:
    """End of sequence and every token whose text holds a line break."""
    llama = runtime_llm.llama
    breaks = {t for t in range(llama.n_vocab()) if b"\n" in llama.detokenize([t])}
    return frozenset({llama.token_eos(), *breaks})


@torch.no_grad()
def sample_answers(
    llm: nn.Module,
    prompts: Sequence[Encoded],
    prefixes: Sequence[torch.Tensor | None],
    soft: torch.Tensor,
    embed_scale: float,
    k: int,
    stops: frozenset[int],
    temperature: float = TEMPERATURE,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> tuple[list[list[int]], torch.Tensor]:
    """`k` answers per prompt (prompt-major), each [soft][after] then sampled tokens until a
    stop token (kept) or `max_new_tokens`; and each answer's log-probability under the
    untempered model (B·k,), the quantity the policy gradient moves. Prompts whose `after`
    differ in length are sampled in separate groups."""
    device = next(llm.parameters()).device
    rows = [i for i in range(len(prompts)) for _ in range(k)]
    answers: list[list[int]] = [[] for _ in rows]
    logp = torch.zeros(len(rows))
    for width in sorted({len(p.after) for p in prompts}):
        group = [r for r, i in enumerate(rows) if len(prompts[i].after) == width]
        ids, lp = _sample_group(
            llm, [prompts[rows[r]] for r in group], [prefixes[rows[r]] for r in group],
            soft[[rows[r] for r in group]].to(device), embed_scale, stops, temperature,
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
    stops: frozenset[int],
    temperature: float,
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
            picked = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)[:, 0]
            gained = torch.log_softmax(logits, dim=-1).gather(1, picked[:, None])[:, 0]
            logp += torch.where(done, 0.0, gained)
            for r in (~done).nonzero()[:, 0].tolist():
                answers[r].append(int(picked[r]))
                done[r] = int(picked[r]) in stops
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


def answer_scores(
    answers: Sequence[Sequence[int]], golds: Sequence[str], text: Callable[[list[int]], str]
) -> torch.Tensor:
    """Each answer's ROUGE-1 F1 against its gold; `text` turns token ids into the answer as
    the task's scorer reads it (stop tokens included: it cleans them)."""
    return torch.tensor(
        [
            unigram_f1(Counter(tokens(text(list(a)))), Counter(tokens(g)))
            for a, g in zip(answers, golds, strict=True)
        ]
    )


def outcome_loss(
    llm: nn.Module,
    prompts: Sequence[Encoded],
    prefixes: Sequence[torch.Tensor | None],
    soft: torch.Tensor,
    embed_scale: float,
    answers: Sequence[Sequence[int]],
    scores: torch.Tensor,
) -> torch.Tensor:
    """The policy-gradient loss of a batch's sampled answers (prompt-major, the same number
    for each prompt), summed over prompts: −Σ (score − the prompt's mean score) · log p(answer),
    log p taken through the soft tokens (with gradient)."""
    k = len(answers) // len(prompts)
    advantage = scores.view(-1, k) - scores.view(-1, k).mean(dim=1, keepdim=True)
    rows = [i for i in range(len(prompts)) for _ in range(k)]
    encoded = [
        Encoded(prompts[i].before, prompts[i].after, list(a))
        for i, a in zip(rows, answers, strict=True)
    ]
    losses, mask = token_losses(llm, encoded, soft[rows], embed_scale, [prefixes[i] for i in rows])
    logp = -(losses * mask).sum(dim=1)
    return -(advantage.flatten().to(logp.device) * logp).sum()
