"""Training data for the head: examples from a LaMP-format task, their history vectors (the
device's own embedder, cached by content), and their token ids exactly as the device
prompts them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_pllm.errors import InvalidInputError
from edge_pllm.inference.bundle import Bundle
from edge_pllm.inference.embedder import Embedder
from edge_pllm.inference.llm import LLM
from edge_pllm.personalization.prompts import build_messages
from edge_pllm.personalization.strategies import MIN_SIMILARITY
from edge_pllm.storage.items import HistoryItem
from edge_pllm.storage.vector_cache import VectorCache, cache_key
from edge_pllm.tasks.lamp import TaskSpec, load_split

from .config import TrainConfig


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


def task_examples(
    task_dir: Path, config: TrainConfig
) -> tuple[TaskSpec, list[Example], list[Example]]:
    """What `train-plug` takes from a LaMP-format task folder: its spec, the examples of
    the training splits (--splits, --profile-examples, --limit) and the held-out examples of
    --validate (none without it)."""
    spec = load_split(task_dir, config.splits[0], config.task).spec
    examples = [
        e
        for s in config.splits
        for e in lamp_examples(
            task_dir, s, spec, from_profiles=config.profile_examples, limit=config.limit
        )
    ]
    held_out: list[Example] = []
    if config.validate:
        held_out = validation_examples(
            lamp_examples(task_dir, config.validate, spec, 0, limit=config.validate_limit)
        )
    return spec, examples, held_out


def vector_cache(home_dir: Path, bundle: Bundle, embedder: Embedder) -> VectorCache:
    """The training's vector cache for the bundle's embedder, in `<home>/cache/`: one file
    per embedder model, tokenizer and pooling, so bundles that share all three share it.
    Vectors are the device's own (the embedder as the store runs it)."""
    files, emb = bundle.manifest["files"], bundle.embedder
    key = cache_key(
        files[emb.file]["sha256"],
        files[emb.tokenizer]["sha256"],
        emb.config.pooling,
        str(emb.config.normalize),
        str(emb.config.max_seq_length),
    )
    return VectorCache(home_dir / "cache" / f"vectors-{key}.sqlite", embedder.embed, emb.config.dim)


class VectorTable:
    """Every distinct text's vector, looked up by text (filled from a VectorCache)."""

    def __init__(self, cache: VectorCache, texts: Sequence[str]):
        unique = list(dict.fromkeys(texts))
        self.index = {t: i for i, t in enumerate(unique)}
        self.matrix = cache.vectors(unique)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.matrix[[self.index[t] for t in texts]]


def retrieve(
    example: Example, table: VectorTable, k: int, min_similarity: float = MIN_SIMILARITY
) -> list[HistoryItem]:
    """The `k` history items nearest the request (cosine, nearest first) whose similarity to
    it is at least `min_similarity`: what plug+rag:k shows at run time (the embedder's
    vectors are unit length, so a dot product is the cosine)."""
    if not example.history or k < 1:
        return []
    scores = table(example.texts) @ table([example.query])[0]
    order = np.argsort(-scores, kind="stable")[:k]
    return [example.history[i] for i in order if scores[i] >= min_similarity]


@dataclass
class Encoded:
    """An example's token ids around the soft tokens: [before][soft][after][target]."""

    before: list[int]  # the frozen part: its keys and values never depend on the persona
    after: list[int]
    target: list[int]


class PromptEncoder:
    """Token ids exactly as the runtime makes them (llama.cpp's tokenizer and the GGUF's chat
    template), split where the runtime puts the soft tokens (`LLM.split_prompt`)."""

    def __init__(self, runtime_llm: LLM, spec: TaskSpec, max_prompt_tokens: int, placement: str):
        self.llm, self.spec = runtime_llm, spec
        self.max_prompt_tokens, self.placement = max_prompt_tokens, placement
        self.eos = runtime_llm.llama.token_eos()

    def __call__(self, example: Example, context: Sequence[HistoryItem] = ()) -> Encoded:
        """`example` as the runtime prompts it, with `context` (retrieved items) shown."""
        prompt = self.llm.apply_chat_template(
            build_messages(example.query, context, None, self.spec.style)
        )
        before, after = self.llm.split_prompt(prompt, self.placement)
        # Rarely needed (requests are clipped, shown items capped by the task): keep the
        # end, it holds the turn markers. (Before the answer, the request is computed once
        # without gradient and is not cut.)
        extra = len(after) - self.max_prompt_tokens
        if extra > 0:
            after = after[extra:]
        target = self.llm.llama.tokenize(example.target.encode(), add_bos=False, special=False)
        return Encoded(before, after, [*target, self.eos])
