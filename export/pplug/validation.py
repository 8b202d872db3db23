"""The held-out check of a head: teacher-forced loss per target token without soft tokens,
with the user's own history, and with another user's. The gap between the last two is the
personalization itself; none − own is task adaptation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_pllm.tasks import metrics

from .data import Encoded, Example, validation_examples
from .distributed import World
from .frozen import FrozenPrefix, token_losses
from .model import PPlugHead


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


def soft_tokens(
    head: PPlugHead, query: tuple[torch.Tensor, ...], histories: Sequence[np.ndarray]
) -> torch.Tensor:
    """The head's soft tokens (B, n_task + n_persona, d_llm) for a batch: `query` is its request
    inputs (see PPlugHead.input_names), `histories` each user's history vectors, padded and
    masked."""
    n_hist = max(len(h) for h in histories)
    hist = np.zeros((len(histories), n_hist, head.config.d_enc), dtype=np.float32)
    mask = np.zeros((len(histories), n_hist), dtype=np.float32)
    for i, h in enumerate(histories):
        hist[i, : len(h)] = h
        mask[i, : len(h)] = 1
    device = head.embed_norm.device
    return head(*query, torch.from_numpy(hist).to(device), torch.from_numpy(mask).to(device))


def validate(
    head: PPlugHead,
    llm: nn.Module,
    examples: Sequence[Example],
    encode: Callable[[Example], Encoded],
    vectors: Callable[[Sequence[str]], np.ndarray],
    query_inputs: Callable[[list[str]], tuple[torch.Tensor, ...]],
    embed_scale: float,
    batch_size: int = 8,
    world: World | None = None,
) -> Validation:
    """The held-out losses of `examples` (those with a history; at least two) without soft
    tokens, with the user's own history, and with the next example's user's history.

    With several processes (`world`), each computes every size-th batch and the rows are
    gathered: the same batches, so the same numbers as one process, on every process."""
    world = world or World()
    examples = validation_examples(examples)
    own = [vectors(e.texts[-head.config.max_history :]) for e in examples]
    other = own[1:] + own[:1]
    names = ("none", "plug", "plug_other")
    mine: dict[int, dict[str, list[float]]] = {}  # each batch's rows, by its start
    was_training = head.training
    head.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(examples), batch_size)[world.rank :: world.size]:
                mine[b] = {k: [] for k in names}
                chunk = examples[b : b + batch_size]
                encoded = [encode(e) for e in chunk]
                prefixes = FrozenPrefix(llm, encoded, progress=False).kv  # once per batch
                query = query_inputs([e.query for e in chunk])
                for name, histories in (("none", None), ("plug", own), ("plug_other", other)):
                    soft = (
                        None
                        if histories is None
                        else soft_tokens(head, query, histories[b : b + batch_size])
                    )
                    losses, mask = token_losses(llm, encoded, soft, embed_scale, prefixes)
                    mine[b][name] = (losses.sum(1) / mask.sum(1)).tolist()
    finally:
        head.train(was_training)
    batches = {b: r for part in world.gather_objects(mine) for b, r in part.items()}
    rows = {k: [v for b in sorted(batches) for v in batches[b][k]] for k in names}
    table = {k: np.array(v)[:, None] for k, v in rows.items()}
    spec = metrics.mean_of("loss", higher_is_better=False)
    gap = metrics.paired_difference(spec, table["plug_other"], table["plug"])["loss"]
    return Validation(
        len(examples), *(float(table[k].mean()) for k in ("none", "plug", "plug_other")), gap
    )
