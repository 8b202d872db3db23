"""LaMP-format tasks: reading them, and how each task's profile and prompts look.

A task folder holds `{split}_questions.json` (a list of {id, input, profile}) and
`{split}_outputs.json` ({task, golds: [{id, output}]}). Each profile entry's fields depend
on the task (LaMP-1 title+abstract, LaMP-2 description+tag, LaMP-3 text+score, LaMP-4
title+text, LaMP-5 title+abstract, LaMP-6 title+text, LaMP-7 text; commit_subject
title+text, where title is the subject and text the body).

Prompt construction for a task lives here and only here: every strategy shares it, so
strategies differ only in which history they add.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..files import atomic_write, private_dir
from ..jsonio import parse_json
from ..personalization.prompts import PromptStyle
from ..storage.items import HistoryItem, NewItem, json_type, normalize_time
from . import metrics

CHAT_TASK = "chat"


@dataclass(frozen=True)
class TaskSpec:
    """One LaMP-style task: its profile fields, metric, and how prompts are written."""

    name: str
    metric: metrics.MetricSpec
    input_field: str  # the profile field that is embedded and shown (the "document")
    output_field: str | None  # the field the user wrote for it (a title, a tag, a score)
    input_label: str
    output_label: str | None
    answer_instruction: str
    max_tokens: int
    answer_kind: str  # "text", "label" or "rating"
    labels: tuple[str, ...] = ()
    item_chars: int = 1000  # how much of a history item's document a prompt shows

    @property
    def style(self) -> PromptStyle:
        return PromptStyle(
            header=(
                "Below are earlier examples from the user you are helping. Follow the user's "
                "own style and conventions."
            ),
            render_item=self.render_item,
            answer=self.clean,
            one_line=self.answer_kind == "text",  # the scorer reads one line (`clean`)
        )

    def item_text(self, entry: dict[str, Any]) -> str:
        """What is stored and embedded for a profile entry: the whole thing the user wrote,
        output first ("subject\n\nbody"), as PPlug's history encoder sees each behaviour."""
        document = str(entry.get(self.input_field) or entry.get("text") or "").strip()
        out = str(entry.get(self.output_field) or "").strip() if self.output_field else ""
        return f"{out}\n\n{document}".strip() if out else document

    def render_item(self, item: HistoryItem) -> str:
        out = str(item.metadata.get(self.output_field) or "") if self.output_field else ""
        document = item.text.strip()
        if out and document.startswith(out):
            document = document[len(out) :].strip()
        document = document[: self.item_chars]
        if not out:
            return f"{self.input_label}: {document}"
        return f"{self.input_label}: {document}\n{self.output_label}: {out}"

    def query(self, question_input: str) -> str:
        if not self.answer_instruction:  # a request asked as it is (the chat task)
            return question_input.strip()
        return f"{question_input.strip()}\n\n{self.answer_instruction}"

    def profile_items(self, profile: list[dict[str, Any]]) -> list[NewItem]:
        items = []
        for i, entry in enumerate(profile):
            if not isinstance(entry, dict):
                raise InvalidInputError(f"Profile entry {i} is not a JSON object.", index=i)
            meta = {k: v for k, v in entry.items() if k != self.input_field}
            items.append(
                NewItem(
                    text=self.item_text(entry), kind="lamp", created_at=_date(entry), metadata=meta
                )
            )
        return items

    def clean(self, raw: str) -> str:
        """The answer as LaMP's scorer should see it."""
        text = raw.strip()
        if self.answer_kind == "label":
            low = text.lower()
            found = [label for label in self.labels if label in low]
            return max(found, key=len) if found else text
        if self.answer_kind == "rating":
            digit = re.search(r"[1-5]", text)
            return digit.group(0) if digit else text
        text = re.sub(r"</?text>", "\n", text)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        # Skip a preamble line ("The subject line for this commit is:") when more follows.
        while len(lines) > 1 and lines[0].endswith(":"):
            lines.pop(0)
        first = lines[0] if lines else ""
        labels = [self.output_label] if self.output_label else []
        for label in [*labels, "subject line", "subject", "title", "headline", "answer"]:
            first = re.sub(rf"^\W*{re.escape(label)}\s*:\s*", "", first, flags=re.I)
        return first.strip().strip('"“”`*').strip()


def _date(entry: dict[str, Any]) -> str | None:
    value = entry.get("date")
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return normalize_time(value)
    except ValueError:
        for fmt in ("%Y-%m-%d %H:%M:%S", "%d %B %Y", "%B %d, %Y"):
            try:
                return datetime.strptime(value.strip(), fmt).replace(tzinfo=UTC).isoformat()
            except ValueError:
                continue
    return None


def _gen(
    name: str,
    input_field: str,
    output_field: str | None,
    input_label: str,
    output_label: str | None,
    instruction: str,
    max_tokens: int = 48,
    item_chars: int = 1000,
) -> TaskSpec:
    return TaskSpec(
        name,
        metrics.GENERATION,
        input_field,
        output_field,
        input_label,
        output_label,
        instruction,
        max_tokens,
        "text",
        item_chars=item_chars,
    )


TASKS: dict[str, TaskSpec] = {
    "LaMP_1": TaskSpec(
        "LaMP_1",
        metrics.CLASSIFY_LAMP1,
        "abstract",
        "title",
        "Abstract",
        "Title",
        "Answer with only [1] or [2].",
        8,
        "label",
        metrics.LAMP1_LABELS,
    ),
    "LaMP_2": TaskSpec(
        "LaMP_2",
        metrics.CLASSIFY_LAMP2,
        "description",
        "tag",
        "Description",
        "Tag",
        "Answer with only the tag.",
        8,
        "label",
        metrics.LAMP2_LABELS,
    ),
    "LaMP_3": TaskSpec(
        "LaMP_3",
        metrics.RATING,
        "text",
        "score",
        "Review",
        "Score",
        "Answer with only the score, a number from 1 to 5.",
        4,
        "rating",
        metrics.LAMP3_LABELS,
    ),
    "LaMP_4": _gen(
        "LaMP_4", "text", "title", "Article", "Headline", "Answer with only the headline."
    ),
    "LaMP_5": _gen(
        "LaMP_5", "abstract", "title", "Abstract", "Title", "Answer with only the title."
    ),
    "LaMP_6": _gen("LaMP_6", "text", "title", "Email", "Subject", "Answer with only the subject."),
    "LaMP_7": _gen(
        "LaMP_7", "text", None, "Tweet", None, "Answer with only the paraphrased tweet.", 64
    ),
    "commit_subject": _gen(
        "commit_subject",
        "text",
        "title",
        "Commit message body",
        "Subject line",
        "Answer with only the subject line.",
        # A shown commit is there for its subject line (its conventions); the start of its
        # body is enough context, and a shorter prompt is faster to train on and to answer.
        item_chars=400,
    ),
    # A user's own requests and the answers they kept (`edge-pllm dump USER --feedback DIR`):
    # the request is asked as it is, as the device is asked it; the profile is plain text.
    CHAT_TASK: _gen(CHAT_TASK, "text", None, "Text", None, "", 128),
}
_ALIASES = {
    "lamp1": "LaMP_1",
    "lamp2": "LaMP_2",
    "lamp3": "LaMP_3",
    "lamp4": "LaMP_4",
    "lamp5": "LaMP_5",
    "lamp6": "LaMP_6",
    "lamp7": "LaMP_7",
    "commitsubject": "commit_subject",
    "commitsubjects": "commit_subject",
    "chat": CHAT_TASK,
}


def task_spec(name: str) -> TaskSpec:
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    key = re.sub(r"^lamp(\d).*", r"lamp\1", key)
    if key in _ALIASES:
        return TASKS[_ALIASES[key]]
    raise InvalidInputError(
        f"Unknown task {name!r}; known: {', '.join(TASKS)} (LaMP-2N/2M read as LaMP_2)."
    )


@dataclass(frozen=True)
class Question:
    id: str
    input: str
    profile: list[dict[str, Any]]


def _read_json(path: Path, what: str) -> Any:
    """The parsed content of `path` (`jsonio.parse_json`: valid UTF-8, bounded numbers and
    nesting); an unreadable file is an InvalidInputError too."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"Cannot read {what} {path} ({exc.strerror or exc}).") from None
    return parse_json(raw, f"The {what} {path}")


def _is_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _is_scalar(value: Any) -> bool:
    """A JSON string or number (or null): what a profile field the task reads may hold."""
    return value is None or isinstance(value, str | float) or _is_id(value)


def questions_fault(data: Any, spec: TaskSpec) -> str | None:
    """What makes `data` (a parsed questions file) not a list of LaMP questions, or None.

    The shape: a list of objects, each with `id` (a string or an integer), `input` (a
    string) and `profile` (a list of objects, in which each field the task reads, i.e. its
    input and output fields, `text` and `date`, is a string, a number or null)."""
    if not isinstance(data, list):
        return f"it holds a JSON {json_type(data)}, not a list of questions"
    read = {spec.input_field, "text", "date"} | ({spec.output_field} - {None})
    for n, q in enumerate(data):
        if not isinstance(q, dict):
            return f"question {n} is a JSON {json_type(q)}, not an object"
        missing = [key for key in ("id", "input", "profile") if key not in q]
        if missing:
            return f"question {n} has no {' and no '.join(map(repr, missing))}"
        if not _is_id(q["id"]):
            return f"the id of question {n} is a JSON {json_type(q['id'])}, not a string or integer"
        if not isinstance(q["input"], str):
            return f"the input of question {n} is a JSON {json_type(q['input'])}, not a string"
        if not isinstance(q["profile"], list):
            return f"the profile of question {n} is a JSON {json_type(q['profile'])}, not a list"
        for i, entry in enumerate(q["profile"]):
            if not isinstance(entry, dict):
                return (
                    f"profile entry {i} of question {n} is a JSON {json_type(entry)}, not an object"
                )
            for key in sorted(read & set(entry)):
                if not _is_scalar(entry[key]):
                    return (
                        f"the {key!r} of profile entry {i} of question {n} is a JSON "
                        f"{json_type(entry[key])}, not a string or number"
                    )
    return None


def outputs_fault(data: Any) -> str | None:
    """What makes `data` (a parsed outputs file) not LaMP gold outputs, or None.

    The shape: an object with an optional `task` (a string) and optional `golds` (a list
    of objects, each with `id`, a string or an integer, and `output`, a string or number)."""
    if not isinstance(data, dict):
        return f"it holds a JSON {json_type(data)}, not an object with 'task' and 'golds'"
    task = data.get("task")
    if task is not None and not isinstance(task, str):
        return f"its task is a JSON {json_type(task)}, not a string"
    golds = data.get("golds", [])
    if not isinstance(golds, list):
        return f"its golds are a JSON {json_type(golds)}, not a list"
    for n, gold in enumerate(golds):
        if not isinstance(gold, dict):
            return f"gold {n} is a JSON {json_type(gold)}, not an object"
        missing = [key for key in ("id", "output") if key not in gold]
        if missing:
            return f"gold {n} has no {' and no '.join(map(repr, missing))}"
        if not _is_id(gold["id"]):
            return f"the id of gold {n} is a JSON {json_type(gold['id'])}, not a string or integer"
        if gold["output"] is None or not _is_scalar(gold["output"]):
            return (
                f"the output of gold {n} is a JSON {json_type(gold['output'])}, not a string "
                "or number"
            )
    return None


@dataclass(frozen=True)
class TaskSplit:
    """One split of a task folder: its questions (streamed) and their gold outputs."""

    folder: Path
    split: str
    spec: TaskSpec
    golds: dict[str, str]

    def questions(self, limit: int | None = None) -> Iterator[Question]:
        """The split's questions (the first `limit`); the whole file is checked first
        (`questions_fault`), so a fault is an InvalidInputError before any is given."""
        path = self.folder / f"{self.split}_questions.json"
        data = _read_json(path, "questions file")
        fault = questions_fault(data, self.spec)
        if fault is not None:
            raise InvalidInputError(f"{path} is not a LaMP questions file: {fault}.")
        for n, q in enumerate(data):
            if limit is not None and n >= limit:
                return
            yield Question(str(q["id"]), q["input"], q["profile"])


def load_split(folder: str | Path, split: str, task: str | None = None) -> TaskSplit:
    """Open `{split}_questions.json` / `{split}_outputs.json` in `folder`; the outputs file
    is read and checked here (`outputs_fault`), the questions file when they are read."""
    folder = Path(folder)
    questions = folder / f"{split}_questions.json"
    outputs = folder / f"{split}_outputs.json"
    if not questions.is_file():
        raise InvalidInputError(f"No {questions.name} in {folder}; is this a LaMP task folder?")
    golds: dict[str, str] = {}
    name = task
    if outputs.is_file():
        data = _read_json(outputs, "outputs file")
        fault = outputs_fault(data)
        if fault is not None:
            raise InvalidInputError(f"{outputs} is not a LaMP outputs file: {fault}.")
        name = name or data.get("task")
        golds = {str(g["id"]): str(g["output"]) for g in data.get("golds", [])}
    return TaskSplit(folder, split, task_spec(name or folder.name), golds)


def write_split(
    folder: str | Path,
    split: str,
    task: str,
    questions: list[dict[str, Any]],
    golds: list[dict[str, Any]],
) -> tuple[Path, Path]:
    """Write `{split}_questions.json` and `{split}_outputs.json` (owner-only, each replaced
    in one step) into `folder`, made owner-only if missing: a task folder `load_split` and
    `train-plug` read. The content is checked as `load_split` checks it before anything is
    written."""
    spec = task_spec(task)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", split):
        raise InvalidInputError(
            f"The split name {split[:80]!r} is not a short label.", field="split"
        )
    outputs = {"task": spec.name, "golds": golds}
    fault = questions_fault(questions, spec) or outputs_fault(outputs)
    if fault is not None:
        raise InvalidInputError(f"Cannot write a LaMP split: {fault}.")
    folder = private_dir(folder)
    written = []
    for name, data in ((f"{split}_questions.json", questions), (f"{split}_outputs.json", outputs)):
        text = json.dumps(data, ensure_ascii=False, indent=1) + "\n"
        written.append(atomic_write(folder / name, text))
    return written[0], written[1]
