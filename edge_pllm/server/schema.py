"""The server's request schemas: every value that crosses the HTTP boundary is parsed and
bounded here, once, the way llama-cpp-python's server uses pydantic models.

Strict types (no "1" for 1, no true for 1), bounds on every number, no unknown fields, and
the OpenAI fields the server does not implement refused unless they ask for the default
(`n: 1`, `logprobs: false`, ...), so a client never gets silently less than it asked for.
`parse` turns a failure into one `InvalidInputError` that names the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from ..errors import InvalidInputError
from ..jsonio import parse_json
from ..storage.items import MAX_ITEM_CHARS, validate_user

try:
    from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    from .errors import MissingDependencyError

    raise MissingDependencyError("pydantic", "server", "The server") from exc

MAX_MESSAGES = 256
MAX_STOP = 4
MAX_K = 100
MAX_LIMIT = 10_000
MAX_ITEMS_PER_REQUEST = 10_000
MAX_ITEM_ID = 2**63 - 1


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains an unpaired surrogate; send valid Unicode text") from None
    return value


def _rating(value: int) -> int:
    if value not in (1, -1):
        raise ValueError("a rating is 1 or -1")
    return value


def _user(value: str) -> str:
    try:
        return validate_user(value)
    except InvalidInputError as exc:
        raise ValueError(str(exc)) from None


Text = Annotated[str, Field(max_length=MAX_ITEM_CHARS), AfterValidator(_utf8)]
ShortText = Annotated[str, Field(max_length=1_000), AfterValidator(_utf8)]
UserName = Annotated[str, AfterValidator(_user)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(max_length=64)]
    name: ShortText | None = None

    def as_dict(self) -> dict[str, str]:
        content = self.content
        if not isinstance(content, str):
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class Extension(_Strict):
    """`edge_pllm: {...}`: what edge-pllm adds to an OpenAI request."""

    strategy: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    # Store the user's turn as history and keep the answer for feedback (server default:
    # `serve --remember`).
    remember: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text"]


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    model: ShortText | None = None
    user: UserName | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: ShortText | Annotated[list[ShortText], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**31)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    edge_pllm: Extension | None = None
    # OpenAI fields accepted only at the value that means "not used".
    n: Literal[1] | None = None
    logprobs: Literal[False] | None = None
    top_logprobs: Literal[0] | None = None
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    logit_bias: Annotated[dict[str, Any], Field(max_length=0)] | None = None


class ChatRequest(_Generation):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: Literal[False] | None = None


class CompletionRequest(_Generation):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]
    echo: Literal[False] | None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class HistoryRequest(_Strict):
    """`{"items": [...]}`, or one item's fields at the top level. The items themselves are
    checked by `items.validate_items`, the one rule for every way history comes in."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    items: Annotated[list[Any], Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)] | None = None

    def item_list(self) -> list[Any]:
        if self.items is not None:
            if self.model_extra:
                raise InvalidInputError(
                    "Send either {'items': [...]} or one item's fields, not both.", field="items"
                )
            return self.items
        if not self.model_extra or "text" not in self.model_extra:
            raise InvalidInputError(
                "Send {'items': [...]} or one item as {'text': ...}.", field="items"
            )
        return [dict(self.model_extra)]


AnswerId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"\A[A-Za-z0-9_.:-]+\z")]


class FeedbackRequest(_Strict):
    """`{"answer_id": ..., "rating": 1}` (or -1), or `{"answer_id": ..., "edit": "..."}`:
    one of the two. The edit is checked as any history item is (`items.validate_items`)."""

    answer_id: AnswerId
    rating: Annotated[int, AfterValidator(_rating)] | None = None
    edit: Text | None = None

    def checked(self) -> FeedbackRequest:
        """This request, if it holds a rating or an edit (one of them); else an
        InvalidInputError."""
        if (self.rating is None) == (self.edit is None):
            raise InvalidInputError(
                "Send a rating (1 or -1) or an edit (the text kept): one of them.",
                field="rating" if self.edit is None else "edit",
            )
        return self


GenerationRequest = ChatRequest | CompletionRequest


def _ascii_int(raw: str, name: str, low: int, high: int) -> int:
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or not low <= int(raw) <= high:
        raise InvalidInputError(
            f"'{name}' must be a whole number from {low} to {high}.", field=name
        )
    return int(raw)


def query_int(params: Any, name: str, default: int, high: int) -> int:
    """A positive integer query parameter (ASCII digits only), bounded by `high`."""
    raw = params.get(name)
    return default if raw is None else _ascii_int(raw, name, 1, high)


def item_id(raw: str) -> int:
    """A history item id from a URL path."""
    return _ascii_int(raw, "item", 1, MAX_ITEM_ID)


M = TypeVar("M", bound=BaseModel)


def _where(loc: tuple[int | str, ...]) -> str:
    # pydantic adds the union member it tried ("str", "list[...]"): not part of the path.
    return ".".join(str(p) for p in loc if isinstance(p, int) or ("[" not in p and p != "str"))


def parse(model: type[M], raw: bytes) -> M:
    """`raw` (a request body) as `model`, or an InvalidInputError naming the first fault."""
    data = parse_json(raw, "The request body")
    if not isinstance(data, dict):
        raise InvalidInputError("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = _where(first["loc"])
        if first["type"] == "extra_forbidden":
            message = f"'{where}' is not a field this server supports"
        elif first["type"] == "literal_error":
            message = f"'{where}' is not supported here ({first['msg'].lower()})"
        else:
            message = f"'{where}': {first['msg'][0].lower()}{first['msg'][1:]}"
        raise InvalidInputError(message.rstrip(".") + ".", field=where or None) from None
