"""What decides a trained head, declared once: `TrainConfig` drives `train-plug`'s options,
the command recorded with the head (which reproduces it exactly) and the head's manifest
entry. Each field carries its flag and help; nothing about an option is written twice."""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import click

from edge_pllm.errors import InvalidInputError

COMMAND = "edge-pllm train-plug"
PLACEMENTS = ("before_answer", "prefix")
INPUT_ENCODERS = ("linear", "trainable")


def option(default: Any, help: str, *, decides: bool = True, **click_kwargs: Any) -> Any:
    """A config field that is also a `train-plug` option (`--field-name`). `decides`: whether
    a resumed run must keep it. Where and how fast the run goes, what is measured after it,
    and where its folders are (they may move; `--init-from` acts only on a fresh start) do
    not decide; the head's shape is checked against its checkpoint in any case."""
    return field(default=default, metadata={"help": help, "decides": decides, **click_kwargs})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a trained Persona-Plug head: its data, shape and training."""

    # --- data
    splits: tuple[str, ...] = option(
        ("train",), "Training split(s); repeatable.", flag="--split", multiple=True
    )
    task: str | None = option(None, "Task name if the outputs file does not say.")
    limit: int | None = option(
        None, "Only the first N questions of each split.", type=click.IntRange(min=1)
    )
    profile_examples: int = option(
        4,
        "Examples drawn from each profile's most recent items, each with only the earlier "
        "items as history (0: the questions only).",
    )
    # --- the head
    placement: str = option(
        "before_answer",
        "Where the soft tokens go. before_answer: between the request and the answer, so the "
        "frozen LLM's keys and values of the request do not depend on the persona and are "
        "computed once per example (training is several times cheaper, and on the device the "
        "request's prefix is shared). prefix: in front of the prompt (the paper).",
        type=click.Choice(PLACEMENTS),
    )
    persona_tokens: int = option(
        4,
        "Persona soft tokens, each from its own attention over the history (1: the paper's "
        "head; the LLM sees T + K soft tokens, T the task tokens).",
        type=click.IntRange(min=1),
    )
    task_tokens: int = option(
        1,
        "Task soft tokens in front of the persona tokens: learned, the same for every user "
        "and request (1: the paper's instruction token; more give the frozen LLM a longer "
        "learned prompt for the task).",
        type=click.IntRange(min=1),
    )
    adapter_rank: int = option(
        0,
        "Rank of a task adapter (LoRA) on the frozen LLM, trained with the head and applied "
        "only to the soft tokens, the answer's header and the answer, so the request's keys "
        "and values stay the plain LLM's (cached; shared on the device). 0: none. Needs "
        "--placement before_answer.",
        type=click.IntRange(min=0),
    )
    adapter_lr: float = option(
        2e-4,
        "Learning rate of the task adapter: lower than the head's, since an adapter of a few "
        "million weights learns the training answers by heart in a few passes over them.",
    )
    attention_scale: float | None = option(
        10.0,
        "Start of a learned scale τ on the attention scores: softmax(τ h·x) can pick the few "
        "items that bear on the request where cosines alone (0: off, the paper) average "
        "nearly the whole history.",
        type=click.FloatRange(min=0),
    )
    center: bool = option(
        True,
        "Centre the history vectors on the training population's mean, so the persona says "
        "how this user differs from everyone (the mean ships with the head).",
    )
    input_encoder: str = option(
        "linear",
        "How the head reads the request. linear: the bundle's frozen embedder's vector through "
        "a learned linear map (a head of a few MB). trainable: a fine-tuned copy of the "
        "sentence encoder fed the request's token ids (the paper; ~90 MB, slower).",
        type=click.Choice(INPUT_ENCODERS),
    )
    encoder_lr: float = option(1e-4, "Learning rate of the trainable input encoder.")
    encoder_source: str | None = option(
        None,
        "The sentence-transformers folder the bundle's embedder was exported from, copied by "
        "--input-encoder trainable (default: the default bundle's all-MiniLM-L6-v2).",
        type=click.Path(exists=True, file_okay=False),
        decides=False,
    )
    max_history: int = option(512, "Newest history items the head reads (the paper: 512).")
    # --- training
    steps: int = option(1200, "Optimizer steps.", type=click.IntRange(min=1))
    batch_size: int = option(
        8,
        "Examples per step; under torchrun the step's, shared out among the processes (the "
        "same head whatever their number).",
        type=click.IntRange(min=1),
    )
    lr: float = option(1e-3, "Learning rate (AdamW, warmup then linear decay).")
    weight_decay: float = option(1e-4, "AdamW weight decay.")
    warmup: float = option(0.05, "Share of the steps spent warming up the learning rate.")
    dropout_copies: int = option(
        10, "History-dropout copies per example, each dropping 1-50 % of it (the paper: 10)."
    )
    outcome_samples: int = option(
        0,
        "Also train on what decoding writes: sample K answers per example as `consensus` "
        "samples them (temperature 0.8, top-k, top-p, min-p), score each by ROUGE-1 against "
        "the gold, and raise the likelihood of those above their example's mean (a policy "
        "gradient; 0: off, else at least 2).",
        type=click.IntRange(min=0),
    )
    outcome_weight: float = option(
        1.0, "With --outcome-samples: the weight of that term beside the cross-entropy."
    )
    init_from: str | None = option(
        None,
        "Start from the head in this training folder's checkpoint (its weights; a fresh "
        "optimizer and schedule), e.g. to fine-tune a trained head with --outcome-samples.",
        type=click.Path(exists=True, file_okay=False),
        decides=False,
    )
    rag: int = option(
        0,
        "Also train plug+rag:K: a share (--rag-fraction) of the examples show their K nearest "
        "history items in the prompt, as plug+rag:K does at run time (0: plug only).",
        type=click.IntRange(min=0),
    )
    rag_fraction: float = option(
        0.5,
        "With --rag: the share of examples shown with retrieved items.",
        type=click.FloatRange(0, 1),
    )
    max_prompt_tokens: int = option(448, "Longest templated request trained through.")
    seed: int = option(0, "Random seed (examples, dropout, initialization).")
    device: str = option(
        "auto",
        "Where to train: auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda, "
        "cuda:N, mps. Checkpoints resume on any device.",
        decides=False,
    )
    threads: int = option(
        0,
        "CPU threads for torch (0: torch's default, lowered to the container's quota or the "
        "global `edge-pllm --threads`).",
        decides=False,
    )
    llm_source: str | None = option(
        None,
        "Train against this HF folder instead of the bundle's GGUF (dequantized).",
        type=click.Path(exists=True, file_okay=False),
        decides=False,
    )
    # --- held-out check
    validate: str | None = option(
        None,
        "After training, measure the held-out loss on this split's questions (e.g. dev): "
        "without soft tokens, with the user's own history and with another user's, and how "
        "much lower the own history's loss is, with a 95 % interval (recorded with the head).",
        decides=False,
    )
    validate_limit: int | None = option(
        None,
        "With --validate: only the split's first N questions (default: all).",
        type=click.IntRange(min=2),
        decides=False,
    )
    checkpoint_every: int = field(default=50, metadata={"record": False})

    def __post_init__(self) -> None:
        check = [
            (self.placement in PLACEMENTS, "placement", f"one of {', '.join(PLACEMENTS)}"),
            (self.input_encoder in INPUT_ENCODERS, "input_encoder", "linear or trainable"),
            (self.persona_tokens >= 1, "persona_tokens", "at least 1"),
            (self.task_tokens >= 1, "task_tokens", "at least 1"),
            (self.adapter_rank >= 0, "adapter_rank", "≥ 0"),
            (
                not self.adapter_rank or self.placement == "before_answer",
                "placement",
                "before_answer with --adapter-rank (the adapter acts after the request)",
            ),
            (self.attention_scale is None or self.attention_scale >= 0, "attention_scale", "≥ 0"),
            (
                self.outcome_samples != 1 and self.outcome_samples >= 0,
                "outcome_samples",
                "0 or at least 2 (each answer is scored against its example's mean)",
            ),
            (
                math.isfinite(self.outcome_weight) and self.outcome_weight >= 0,
                "outcome_weight",
                "a number ≥ 0",
            ),
            (self.rag >= 0, "rag", "≥ 0"),
            (0 <= self.rag_fraction <= 1, "rag_fraction", "within [0, 1]"),
            (self.steps >= 1 and self.batch_size >= 1, "steps", "steps and batch size ≥ 1"),
            (self.max_history >= 1, "max_history", "at least 1"),
            (self.validate not in self.splits, "validate", "a held-out split, not a training one"),
        ]
        refuse_unmet(self, check)

    @property
    def scale(self) -> float | None:
        """The attention scale's start, None when off (0 on the command line)."""
        return self.attention_scale or None

    def record(self) -> dict[str, Any]:
        """The settings recorded in the head's manifest entry."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in fields(self)
            if f.metadata.get("record", True)
        }

    def decisive(self) -> dict[str, Any]:
        """The recorded settings that decide the trained head: a checkpoint keeps them, and
        a run that resumes it must have the same."""
        record = self.record()
        return {f.name: record[f.name] for f in fields(self) if f.metadata.get("decides")}

    def command(self, task_dir: str, *more: Any) -> str:
        """The `train-plug` command line that trains this head again: every setting spelled
        out, so a later change of a default does not change what it reproduces (`more`:
        other option configs of the run, e.g. its `FederatedConfig`)."""
        words = [*shlex.split(COMMAND), task_dir]
        for config in (self, *more):
            words += option_words(config)
        return shlex.join(words)


def refuse_unmet(config: Any, checks: list[tuple[bool, str, str]]) -> None:
    """The first of `checks` (met, field, what it must be) that is not met, as a typed error
    naming the field's value."""
    for ok, name, wanted in checks:
        if not ok:
            raise InvalidInputError(
                f"{name} must be {wanted} (got {getattr(config, name)!r}).", field=name
            )


def option_words(config: Any) -> list[str]:
    """The command-line words that set every option field of `config` to its value."""
    words: list[str] = []
    for f in fields(config):
        if "help" not in f.metadata:
            continue
        value, flag = getattr(config, f.name), _flag(f)
        if value is None:
            continue
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, tuple):
            words += [w for v in value for w in (flag, str(v))]
        else:
            words += [flag, str(value)]
    return words


STRATEGIES = ("fedavg", "fedprox", "fedadam")
SPLIT_BY = ("person", "repository")


@dataclass(frozen=True)
class FederatedConfig:
    """How a head is trained on Flower (`train-plug --federated-sim N`): the clients, the
    rounds, the server's strategy and differential privacy. Recorded with the head and in
    its reproduce command beside `TrainConfig`; `--steps` is each client's steps in all."""

    federated_sim: int | None = option(
        None,
        "Train federated: simulate N clients on this machine (Flower's simulation engine), "
        "the training split shared out among them by --split-by; each sends only the head's "
        "weights.",
        type=click.IntRange(min=1),
    )
    split_by: str = option(
        "person",
        "How the simulated clients share the training split. person: each user's examples "
        "on one client. repository: each repository's users on one client (question ids "
        "'<repository>-<n>', as `edge-pllm corpus` writes them).",
        type=click.Choice(SPLIT_BY),
    )
    local_steps: int = option(
        25,
        "Steps each client trains per round, from the server's head; the rounds are "
        "--steps / --local-steps.",
        type=click.IntRange(min=1),
    )
    strategy: str = option(
        "fedavg",
        "How the server combines the clients' heads. fedavg: their mean, weighted by "
        "examples. fedprox: the same, each client's loss pulled toward the server's head "
        "(--proximal-mu). fedadam: Adam on the server over the mean's change (--server-lr).",
        type=click.Choice(STRATEGIES),
    )
    proximal_mu: float = option(
        0.01, "With fedprox: the weight μ of (μ/2)·‖w − w_server‖² in each client's loss."
    )
    server_lr: float = option(0.01, "With fedadam: the server's learning rate η.")
    fraction: float = option(
        1.0,
        "Share of the clients each round trains (a client trains --local-steps in each round "
        "it is in).",
        type=click.FloatRange(0, 1, min_open=True),
    )
    min_clients: int = option(
        1,
        "Fewest well-formed updates a round needs; a round with fewer keeps the head as it "
        "was (clients that drop or send a malformed update are left out).",
        type=click.IntRange(min=1),
    )
    dp_noise: float = option(
        0.0,
        "Differential privacy: the noise multiplier z of the Gaussian noise the server adds "
        "to the mean of the clients' clipped updates (Flower's client-side fixed clipping; "
        "the ε spent is reported). 0: off.",
        type=click.FloatRange(min=0),
    )
    dp_clip: float = option(
        1.0,
        "With --dp-noise: the L2 norm each client's update is clipped to, on the client.",
        type=click.FloatRange(min=0, min_open=True),
    )
    dp_delta: float = option(
        1e-5,
        "With --dp-noise: the δ at which ε is reported.",
        type=click.FloatRange(0, 1, min_open=True, max_open=True),
    )
    secure_aggregation: bool = option(
        False,
        "Secure aggregation (Flower's SecAgg+): each client masks its head, so the server "
        "learns the mean of a round's heads and no one client's. fedavg only, every client "
        "weighing the same; at least 3 clients a round; not with --dp-noise.",
    )
    round_timeout: float = option(
        3600.0,
        "Seconds the server waits for a round's updates; a client not done by then is left "
        "out of the round.",
        type=click.FloatRange(min=0, min_open=True),
        decides=False,
    )

    def __post_init__(self) -> None:
        check = [
            (self.strategy in STRATEGIES, "strategy", f"one of {', '.join(STRATEGIES)}"),
            (self.split_by in SPLIT_BY, "split_by", "person or repository"),
            (self.local_steps >= 1, "local_steps", "at least 1"),
            (0 < self.fraction <= 1, "fraction", "within (0, 1]"),
            (self.min_clients >= 1, "min_clients", "at least 1"),
            (
                not self.federated_sim or self.min_clients <= self.federated_sim,
                "min_clients",
                f"at most the {self.federated_sim} clients of --federated-sim",
            ),
            (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0, "proximal_mu", "≥ 0"),
            (math.isfinite(self.server_lr) and self.server_lr > 0, "server_lr", "> 0"),
            (math.isfinite(self.dp_noise) and self.dp_noise >= 0, "dp_noise", "≥ 0"),
            (math.isfinite(self.dp_clip) and self.dp_clip > 0, "dp_clip", "> 0"),
            (0 < self.dp_delta < 1, "dp_delta", "within (0, 1)"),
            (
                not self.dp_noise or self.strategy != "fedadam",
                "strategy",
                "fedavg or fedprox with --dp-noise (Flower accounts ε for a plain mean)",
            ),
            (
                not self.secure_aggregation or self.strategy == "fedavg",
                "strategy",
                "fedavg with --secure-aggregation (SecAgg+ releases only the mean)",
            ),
            (
                not (self.secure_aggregation and self.dp_noise),
                "dp_noise",
                "0 with --secure-aggregation (Flower adds its noise to updates it can see)",
            ),
            (
                not self.secure_aggregation or not self.federated_sim or self.sampled() >= 3,
                "secure_aggregation",
                "off with fewer than 3 clients a round (SecAgg+ shares each client's key "
                "among at least 3)",
            ),
        ]
        refuse_unmet(self, check)

    def check_with(self, config: TrainConfig) -> None:
        """Refuse federated options without --federated-sim, and settings a federation
        cannot keep: --init-from (the server's head is the start), a centring mean beside
        differential privacy (the mean of the histories would be published un-noised)."""
        if not self.federated_sim:
            given = [
                flag_of(f.name, FederatedConfig)
                for f in fields(self)
                if getattr(self, f.name) != f.default
            ]
            if given:
                raise InvalidInputError(
                    f"{', '.join(given)} without --federated-sim: they set federated "
                    "training, so add --federated-sim N, or leave them out.",
                    field="federated_sim",
                )
            return
        if config.init_from:
            raise InvalidInputError(
                "--init-from is not supported with --federated-sim: every client starts from "
                "the server's head.",
                field="init_from",
            )
        if self.dp_noise and config.center:
            raise InvalidInputError(
                "--dp-noise needs --no-center: the centring mean is computed from the "
                "histories and would ship with the head un-noised, outside the ε reported.",
                field="center",
            )

    def rounds(self, steps: int) -> int:
        """The rounds of a run of `steps` steps per client (--steps / --local-steps)."""
        if steps % self.local_steps:
            raise InvalidInputError(
                f"--steps {steps} is not a whole number of rounds of --local-steps "
                f"{self.local_steps}: pass --steps as a multiple of --local-steps.",
                field="local_steps",
            )
        return steps // self.local_steps

    def sampled(self) -> int:
        """Clients each round trains (at least --min-clients, at most all of them)."""
        n = self.federated_sim or 1
        return min(n, max(int(n * self.fraction), self.min_clients))


def flag_of(name: str, cls: type | None = None) -> str:
    """The command-line flag of field `name` of `cls` (default `TrainConfig`)."""
    return _flag(next(f for f in fields(cls or TrainConfig) if f.name == name))


def _flag(f: Any) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def config_options(cls: type = TrainConfig) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a click command with one option per field of `cls` (the field's name is the
    parameter's), defaults and help taken from the fields."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(fields(cls)):
            if "help" not in f.metadata:
                continue
            meta = dict(f.metadata)
            help_text, flag = meta.pop("help"), meta.pop("flag", None) or _flag(f)
            meta.pop("decides", None)
            default = f.default if f.default is not MISSING else None
            if isinstance(default, bool):
                decl = [f"{flag}/--no-{flag[2:]}", f.name]
            else:
                decl = [flag, f.name]
            fn = click.option(*decl, default=default, show_default=True, help=help_text, **meta)(fn)
        return fn

    return decorate


def config_from_options(cls: type = TrainConfig, **values: Any) -> Any:
    """The config for a command's parsed options (those that are fields of `cls`)."""
    names = {f.name for f in fields(cls)}
    return cls(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
    )


def configs_from_words(words: Sequence[str], *classes: type) -> tuple[Any, ...]:
    """The configs of `classes` that `train-plug`'s option words set, each option checked
    as the command checks it (a Flower run config carries them as one string)."""

    def parsed(**values: Any) -> dict[str, Any]:
        return values

    command: Callable[..., Any] = parsed
    for cls in reversed(classes):
        command = config_options(cls)(command)
    try:
        values = click.command(add_help_option=False)(command).main(
            list(words), prog_name="options", standalone_mode=False
        )
    except click.ClickException as exc:
        raise InvalidInputError(
            f"The training options {shlex.join(words)!r} are not train-plug's: "
            f"{exc.format_message()}",
            field="options",
        ) from None
    return tuple(config_from_options(cls, **values) for cls in classes)


__all__ = [
    "FederatedConfig",
    "TrainConfig",
    "asdict",
    "config_from_options",
    "config_options",
    "configs_from_words",
    "flag_of",
    "option_words",
]
