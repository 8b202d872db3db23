"""The evaluation runner: every strategy on a LaMP-format task, resumable, with a report.

Each question's profile becomes one user's history (user `split:id`), so the history a
query sees is exactly its own profile. Embeddings are computed once per distinct item text
and cached in the run folder. Predictions are appended to `predictions.jsonl` as they are
made; a killed run started again skips what is already there.

Besides LLM strategies, two trivial floors give every number context (generation tasks
with an output field): `floor:first-line` (the input document's first line) and
`floor:latest` (the output the user wrote most recently).

Evaluation spreads over machines: `RunConfig.shard` (`--shard I/N`) answers every N-th
query only and scores nothing; `merge` gathers the shards' predictions into one run
folder, after which `run` scores them exactly as one process would have (it finds every
answer done and generates nothing).

The ablation `STRATEGY@other` runs a strategy with the history of another query's user (the
next query in the split): the gap between `plug` and `plug@other` is the personalization
itself; the rest is task adaptation.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .decoding.decoders import resolve
from .errors import BundleError, InvalidInputError
from .files import atomic_write, open_private, private_dir
from .inference.llm import SamplingConfig
from .jsonio import parse_json
from .personal import PersonalLLM
from .storage.parts import texts_to_embed
from .storage.vector_cache import VectorCache
from .tasks import metrics
from .tasks.lamp import Question, TaskSpec, TaskSplit, load_split

FLOORS = ("floor:first-line", "floor:latest")
PREDICTIONS = "predictions.jsonl"
RUN_LLM = "llm.json"  # which model's answers a run folder holds


def claim(folder: Path, llm: str) -> None:
    """Mark `folder` as holding the answers of `llm`, or InvalidInputError if it holds another
    model's: a resumed or merged run never mixes two models' answers under one name. A
    folder made before runs were marked is taken as it is."""
    if not llm:
        return
    path = folder / RUN_LLM
    if path.is_file():
        found = parse_json(path.read_bytes(), str(path))
        held = found.get("llm") if isinstance(found, dict) else None
        if held != llm:
            raise InvalidInputError(
                f"{folder} holds the answers of another model ({held}, not {llm}); give this "
                "run another --out.",
                field="out",
            )
    elif folder.is_dir():
        atomic_write(path, json.dumps({"llm": llm}))


def floor_answer(strategy: str, spec: TaskSpec, question: Question) -> str:
    if strategy == "floor:first-line":
        body = question.input.split(":", 1)[1] if ":" in question.input else question.input
        lines = [line.strip() for line in body.splitlines() if line.strip()]
        return lines[0] if lines else ""
    dated = [p for p in question.profile if spec.output_field and p.get(spec.output_field)]
    if not dated:
        return ""
    latest = max(enumerate(dated), key=lambda ip: (str(ip[1].get("date", "")), ip[0]))[1]
    return str(latest[spec.output_field])


@dataclass(frozen=True)
class Shard:
    """Share `index` (1-based) of `count`: the queries at positions index−1, index−1+count, …"""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`"2/4"` → Shard(2, 4); an InvalidInputError for anything else."""
        index, _, count = text.partition("/")
        digits = (index, count)  # bounded before they are read as numbers
        if not all(d.isascii() and d.isdigit() and len(d) <= 6 for d in digits):
            raise InvalidInputError(
                f"--shard {text[:40]!r} is not I/N (e.g. 2/4: the second of four shares).",
                field="shard",
            )
        if not 1 <= int(index) <= int(count) <= 10_000:
            raise InvalidInputError(
                f"--shard {text[:40]!r}: I must be 1..N, and N at most 10,000.", field="shard"
            )
        return cls(int(index), int(count))

    def owns(self, position: int) -> bool:
        return position % self.count == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class RunConfig:
    """What to evaluate and where to keep the run."""

    task_dir: Path
    splits: list[str]
    strategies: list[str]
    out_dir: Path
    limit: int | None = None
    floors: bool = True
    task: str | None = None
    max_tokens: int | None = None
    shard: Shard | None = None  # answer this share of the queries only, and score nothing
    profile_items: int | None = None  # keep each user's newest N profile items (cold start)
    llm: str = ""  # the model that answers (name and sha256): a run folder holds one model's


@dataclass
class SplitResult:
    split: str
    n: int
    metrics: dict[str, dict[str, metrics.Estimate]] = field(default_factory=dict)
    vs_none: dict[str, dict[str, metrics.Estimate]] = field(default_factory=dict)
    # STRATEGY − STRATEGY@other on the same queries: the personalization itself.
    vs_other: dict[str, dict[str, metrics.Estimate]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _is_row(row: Any) -> bool:
    """Whether `row` (a parsed line of predictions.jsonl) is a prediction as `run` writes it."""
    return (
        isinstance(row, dict)
        and all(isinstance(row.get(key), str) for key in ("split", "strategy", "id", "output"))
        and isinstance(row.get("seconds"), int | float)
        and not isinstance(row.get("seconds"), bool)
    )


def _load_done(path: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Rows already written; a last line cut short by a kill is removed (it is redone), and
    so is any line that is not a prediction (`jsonio.parse_json` reads each line: bounded
    numbers and nesting)."""
    done: dict[tuple[str, str, str], dict[str, Any]] = {}
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)
            data = data[: data.rfind(b"\n") + 1]
        for line in data.splitlines():
            try:
                row = parse_json(line, f"A line of {path}")
            except InvalidInputError:
                continue  # a line cut by a kill, or damaged: redone
            if _is_row(row):
                done[(row["split"], row["strategy"], row["id"])] = row
    return done


def _ingest(
    pllm: PersonalLLM,
    cache: VectorCache,
    spec: TaskSpec,
    user: str,
    q: Question,
    keep: int | None = None,
) -> None:
    items = [i for i in spec.profile_items(q.profile) if i.text.strip()]
    if keep is not None:  # the user's newest `keep` items: a user with little history
        items = sorted(items, key=lambda i: i.created_at or "")[max(len(items) - keep, 0) :]
    if not items:
        return
    if pllm.store.has_user(user) and pllm.store.count(user) >= len({i.text for i in items}):
        return
    pllm.store.add(user, items, cache.vectors(texts_to_embed(i.text for i in items)))


def run(config: RunConfig, pllm: PersonalLLM, progress: bool = True) -> list[SplitResult]:
    """Evaluate every strategy on every split; returns the metrics (also written to disk).
    A sharded run answers its share and returns no metrics: `merge` the shards, then run
    again to score."""
    for s in config.strategies:
        base, _, variant = s.partition("@")
        plan = resolve(base)  # fail fast on a bad name
        if variant not in ("", "other"):
            raise InvalidInputError(
                f"Unknown variant @{variant} in {s!r}; the one known is @other."
            )
        if any(p.needs_head for p in plan.prompts) and pllm.plug is None:
            # (a head this model cannot use raises here): said before any answer
            raise BundleError(f"{s} needs a Persona-Plug head, which this bundle lacks.")
    private_dir(config.out_dir)
    claim(config.out_dir, config.llm)
    pred_path = config.out_dir / PREDICTIONS
    done = _load_done(pred_path)
    cache = VectorCache(
        config.out_dir / "embeddings.sqlite", pllm.embedder.embed, pllm.embedder.dim
    )
    results = []
    try:
        with open_private(pred_path, "a", field="out") as out:
            for split in config.splits:
                task = load_split(config.task_dir, split, config.task)
                if config.shard is None and task.spec.metric is metrics.GENERATION:
                    metrics.require_rouge()  # before the answers, not after them
                result = _run_split(config, pllm, cache, task, done, out, progress)
                if result is not None:
                    results.append(result)
    finally:
        cache.close()
    return results


def _expected(config: RunConfig, task: TaskSplit) -> list[tuple[str, str, str]]:
    """Every (split, strategy, id) a whole run of `config` answers on `task`."""
    questions = list(task.questions(config.limit))
    return [(task.split, s, q.id) for q in questions for s in _strategies(config, task.spec)]


def _strategies(config: RunConfig, spec: TaskSpec) -> list[str]:
    text_task = spec.output_field and spec.answer_kind == "text"
    return (list(FLOORS) if config.floors and text_task else []) + config.strategies


def merge(config: RunConfig, shards: list[Path]) -> int:
    """Gather the predictions of the shard run folders `shards` into `config.out_dir`, and
    check they answer every query of `config` (same task, splits, strategies and limit).
    Returns how many predictions were added; InvalidInputError if two shards disagree on
    an answer or one is missing (naming it)."""
    private_dir(config.out_dir)
    claim(config.out_dir, config.llm)
    pred_path = config.out_dir / PREDICTIONS
    done = _load_done(pred_path)
    added: dict[tuple[str, str, str], dict[str, Any]] = {}
    for folder in shards:
        if not (folder / PREDICTIONS).is_file():
            raise InvalidInputError(f"{folder} holds no {PREDICTIONS}: is it a shard's run folder?")
        if (folder / RUN_LLM).is_file():
            claim(folder, config.llm)
        for key, row in _load_done(folder / PREDICTIONS).items():
            known = done.get(key) or added.get(key)
            if known is not None and known["output"] != row["output"]:
                raise InvalidInputError(
                    f"Two runs disagree on {key[1]} for {key[2]} ({key[0]}): were they made "
                    "with the same bundle and settings?"
                )
            if known is None:
                added[key] = row
    for split in config.splits:
        task = load_split(config.task_dir, split, config.task)
        missing = [k for k in _expected(config, task) if k not in done and k not in added]
        if missing:
            split_, strategy, qid = missing[0]
            raise InvalidInputError(
                f"The shards lack {len(missing)} answers of {split_} (first: {strategy} for "
                f"{qid}); run the missing --shard and merge again."
            )
    with open_private(pred_path, "a", field="out") as out:
        for row in added.values():
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(added)


def _run_split(
    config: RunConfig,
    pllm: PersonalLLM,
    cache: VectorCache,
    task: TaskSplit,
    done: dict[tuple[str, str, str], dict[str, Any]],
    out: Any,
    progress: bool,
) -> SplitResult | None:
    spec = task.spec
    strategies = _strategies(config, spec)
    questions = list(task.questions(config.limit))
    missing_gold = [q.id for q in questions if q.id not in task.golds]
    if missing_gold:
        raise InvalidInputError(
            f"{len(missing_gold)} questions of {task.split} have no gold output "
            f"(first: {missing_gold[0]}); check {task.split}_outputs.json."
        )
    sampling = SamplingConfig(max_tokens=config.max_tokens or spec.max_tokens)
    shard = config.shard
    mine = [q for n, q in enumerate(questions) if shard is None or shard.owns(n)]
    total = len(mine) * len(strategies)
    todo = [(q, s) for q in mine for s in strategies if (task.split, s, q.id) not in done]
    bar = tqdm(
        total=total,
        initial=total - len(todo),
        desc=f"{spec.name} {task.split}" + (f" shard {shard}" if shard else ""),
        unit="answer",
        disable=not progress,
    )
    with bar:
        for n, q in enumerate(questions):
            if shard is not None and not shard.owns(n):
                continue
            user = f"{task.split}:{q.id}"
            pending = [s for s in strategies if (task.split, s, q.id) not in done]
            if not pending:
                continue
            if any(not s.startswith("floor:") for s in pending):
                _ingest(pllm, cache, spec, user, q, config.profile_items)
            for s in pending:
                started = time.perf_counter()
                if s.startswith("floor:"):
                    raw = floor_answer(s, spec, q)
                else:
                    base, _, variant = s.partition("@")
                    history_user = user
                    if variant == "other":
                        other = questions[(n + 1) % len(questions)]
                        history_user = f"{task.split}:{other.id}"
                        _ingest(pllm, cache, spec, history_user, other, config.profile_items)
                    # A user without history gets what the strategy gives such a user (the
                    # plain prompt, or plug's population persona).
                    raw = pllm.generate(
                        history_user,
                        spec.query(q.input),
                        strategy=base,
                        sampling=sampling,
                        style=spec.style,
                    ).text
                row = {
                    "split": task.split,
                    "strategy": s,
                    "id": q.id,
                    "raw": raw,
                    "output": spec.clean(raw),
                    "seconds": time.perf_counter() - started,
                }
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                out.flush()
                done[(task.split, s, q.id)] = row
                bar.update()
    if shard is not None:
        return None
    return _score(config, task, questions, strategies, done)


def _score(config, task, questions, strategies, done) -> SplitResult:  # type: ignore[no-untyped-def]
    spec = task.spec
    golds = [task.golds[q.id] for q in questions]
    result = SplitResult(task.split, len(questions))
    rows_by = {}
    for s in strategies:
        preds = [done[(task.split, s, q.id)]["output"] for q in questions]
        rows_by[s] = spec.metric.per_example(preds, golds)
        result.metrics[s] = metrics.bootstrap(spec.metric, rows_by[s])
        result.seconds[s] = sum(done[(task.split, s, q.id)]["seconds"] for q in questions)
        outputs = {
            "task": spec.name,
            "golds": [{"id": q.id, "output": p} for q, p in zip(questions, preds, strict=True)],
        }
        name = s.replace(":", "-")
        atomic_write(
            config.out_dir / f"{task.split}_{name}_outputs.json",
            json.dumps(outputs, ensure_ascii=False, indent=1),
        )
    if "none" in rows_by:
        for s in strategies:
            if s != "none":
                result.vs_none[s] = metrics.paired_difference(
                    spec.metric, rows_by[s], rows_by["none"]
                )
    for s in strategies:
        base, _, variant = s.partition("@")
        if variant == "other" and base in rows_by:
            gap = metrics.paired_difference(spec.metric, rows_by[base], rows_by[s])
            result.vs_other[base] = gap
    atomic_write(
        config.out_dir / f"{task.split}_metrics.json", json.dumps(_as_json(result), indent=1)
    )
    return result


def _as_json(result: SplitResult) -> dict[str, Any]:
    def est(e: metrics.Estimate) -> dict[str, float]:
        return {"value": e.value, "low": e.low, "high": e.high}

    return {
        "split": result.split,
        "n": result.n,
        "metrics": {s: {m: est(e) for m, e in ms.items()} for s, ms in result.metrics.items()},
        "vs_none": {s: {m: est(e) for m, e in ms.items()} for s, ms in result.vs_none.items()},
        "vs_other": {s: {m: est(e) for m, e in ms.items()} for s, ms in result.vs_other.items()},
        "seconds": result.seconds,
    }


def _signed(e: metrics.Estimate) -> str:
    return f"{e.value:+.3f} [{e.low:+.3f}, {e.high:+.3f}]"


def report(results: list[SplitResult], spec: TaskSpec, context: dict[str, str]) -> str:
    """A Markdown report: one table per split, strategies × metrics with 95 % intervals."""
    lines = [f"# Evaluation: {spec.name}", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    lines += [f"- generated: {datetime.now(UTC).isoformat(timespec='seconds')}", ""]
    names = spec.metric.names
    for r in results:
        lines += [f"## {r.split} ({r.n} queries)", ""]
        head = ["strategy", *names, f"Δ {names[0]} vs none", "s/query"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s, ms in r.metrics.items():
            cells = [f"`{s}`"]
            cells += [f"{ms[m].value:.3f} [{ms[m].low:.3f}, {ms[m].high:.3f}]" for m in names]
            d = r.vs_none.get(s, {}).get(names[0])
            cells.append(_signed(d) if d else "")
            cells.append(f"{r.seconds[s] / max(r.n, 1):.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if r.vs_other:
            lines += [
                f"Personalization ({r.split}): own history − another user's (`@other`)",
                "",
                "| strategy | " + " | ".join(f"Δ {m}" for m in names) + " |",
                "|" + "---|" * (len(names) + 1),
            ]
            for s, ms in r.vs_other.items():
                cells = [f"`{s}`"]
                cells += [_signed(ms[m]) for m in names]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    lines += [
        "Intervals: 95 % percentile bootstrap over queries (1,000 resamples); Δ is the paired",
        "difference against `none` on the same queries. Floors: `floor:first-line` copies the",
        "input document's first line, `floor:latest` the user's most recent output.",
        "",
    ]
    return "\n".join(lines)
