"""Secure aggregation on Flower (SecAgg+, `--secure-aggregation`): each client masks its
head with random masks it agreed on with the others, so the server learns the mean of the
clients' heads and no one client's.

Flower 1.42 runs SecAgg+ only in its legacy workflow (`SecAggPlusWorkflow` inside
`DefaultWorkflow`, with a legacy strategy and `FitIns`/`FitRes` messages), not under the
Message API strategies the rest of the federation uses. This module speaks that dialect:
on the server, `run_rounds` drives the workflow with `SecureMean` (the plain mean, every
client weighing the same: a client's update is quantized with its weight, and equal
weights keep SecAgg+'s full precision); on a client, `secure_when_asked` hands the
protocol's stages to Flower's `secaggplus_mod` and `legacy_round` turns the round's
`FitIns` into the same training as any round (`federated.train_on`) and its result into a
`FitRes`, which the mod masks before it leaves.

What the server can no longer do is look at one update: `Guard`'s checks of each reply
become checks of the mean (its shapes, finite values) and of what each client says of
itself (head version, examples trained on); a round that fails them keeps the head.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from edge_pllm.errors import InvalidInputError

METRIC_KEYS = ("num-examples", "passes", "train-loss")  # what a client's metrics hold

log = logging.getLogger("edge_pllm.federated")

MIN_CLIENTS = 3  # SecAgg+ shares each client's key among at least 3


class Tallies(Protocol):
    """What `federated.Tally` records (the server's account of each round)."""

    refused: list[str]
    dropped: list[str]
    kept_rounds: list[int]
    losses: dict[int, float]
    examples: dict[int, int]


# --- a client ---------------------------------------------------------------------------------


def is_secure(message: Message) -> bool:
    """Whether `message` is a stage of the SecAgg+ protocol."""
    return RECORD_KEY_CONFIGS in message.content.config_records


def asks_legacy(message: Message) -> bool:
    """Whether `message` asks for a round in the legacy dialect (a `FitIns`)."""
    return "fitins.parameters" in message.content.array_records


def secure_when_asked(
    message: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """A client mod: the SecAgg+ protocol (Flower's `secaggplus_mod`) for its messages,
    every other message straight through."""
    if is_secure(message):
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


Train = Callable[[Sequence[np.ndarray], Mapping[str, Any]], tuple[ArrayRecord, MetricRecord, str]]


# The loss and the example count ride in the masked sum, scaled into its range (±8 at
# least, 2²² steps): a loss to 800 nats within 4e-4, a count to 80,000 within 0.04.
LOSS_SCALE, COUNT_SCALE = 1e-2, 1e-4


def legacy_round(message: Message, context: Context, train: Train) -> Message:
    """The round's training in SecAgg+'s dialect: `train(weights, config)` on the
    `FitIns`, its result as a `FitRes` of weight 1. The loss and the example count travel
    as two more (scaled) weights, so the server learns only their mean; the metrics say
    only the head's version and the examples trained on, both settings. A head with a
    value not finite, or outside the range SecAgg+ quantizes (it would be clipped
    silently), is refused."""
    fitins: FitIns = compat.recorddict_to_fitins(message.content, keep_input=True)
    arrays, metrics, version = train(parameters_to_ndarrays(fitins.parameters), fitins.config)
    weights = [np.atleast_1d(a.numpy()) for a in arrays.values()]  # SecAgg+ garbles 0-d
    state = context.state.config_records.get(RECORD_KEY_STATE)
    limit = float(state["clipping_range"]) if state and "clipping_range" in state else math.inf
    extra = [
        np.array([float(metrics[METRIC_KEYS[2]]) * LOSS_SCALE], np.float32),
        np.array([int(metrics[METRIC_KEYS[0]]) * COUNT_SCALE], np.float32),
    ]
    weights += extra
    if not all(np.isfinite(w).all() and float(np.abs(w).max()) <= limit for w in weights):
        raise InvalidInputError(
            f"The trained head, its loss or its example count lie outside secure "
            f"aggregation's range ±{limit:g} (or are not finite): train it again in a new "
            "folder with a lower --lr, or without --secure-aggregation.",
            field="secure_aggregation",
        )
    said: dict[str, Scalar] = {"version": version, "passes": int(metrics[METRIC_KEYS[1]])}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), 1, said)
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)


# --- the server -------------------------------------------------------------------------------


class SecureMean(LegacyFedAvg):
    """The plain mean of the clients' heads as SecAgg+ releases it, checked as far as the
    server can see: a round in which a client trained another head version or another
    number of examples, fewer than `min_clients` answered, or the mean has other shapes
    or values not finite keeps the head."""

    def __init__(
        self,
        *,
        initial: ArrayRecord,
        config: Mapping[str, Any],
        version: str,
        passes: int,
        sampled: int,
        clients: int,
        fraction: float,
        min_clients: int,
        first_round: int,
        tally: Tallies,
        after: Callable[[int, ArrayRecord], object],
        clip: float,
    ) -> None:
        self.clip = clip  # the range SecAgg+ quantizes in (`clipping_range`)
        self.handled: set[int] = set()  # rounds that reached aggregate_fit
        self.names = list(initial.keys())
        self.shapes = [tuple(a.shape) for a in initial.values()]
        self.config, self.version, self.passes = dict(config), version, passes
        self.min_clients, self.first_round, self.tally, self.after = (
            min_clients, first_round, tally, after
        )  # fmt: skip
        super().__init__(
            fraction_fit=fraction,
            fraction_evaluate=0.0,
            min_fit_clients=sampled,
            min_evaluate_clients=0,
            min_available_clients=clients,
            initial_parameters=ndarrays_to_parameters(
                [np.atleast_1d(a.numpy()) for a in initial.values()]  # SecAgg+ garbles 0-d
            ),
            on_fit_config_fn=self.fit_config,
            accept_failures=True,
        )

    def fit_config(self, server_round: int) -> dict[str, Scalar]:
        """What every client is sent with the head: the federation's round (clients keep
        their checkpoints by it), the head's version, the centring mean, the norm."""
        mean = np.asarray(self.config["history-mean"], dtype=np.float32).tobytes()
        # a legacy config holds scalars: the mean goes as float32 bytes
        number = self.first_round + server_round
        return {**self.config, "history-mean": mean, "server-round": number}

    def problem(self, res: FitRes) -> str | None:
        if res.metrics.get("version") != self.version:
            return f"head version {res.metrics.get('version')!r}, not {self.version!r}"
        if res.metrics.get("passes") != self.passes:
            return f"{res.metrics.get('passes')!r} examples trained on, not {self.passes}"
        if res.num_examples != 1:  # the weight its update was quantized with
            return f"weight {res.num_examples!r}, not 1"
        return None

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        absolute = self.first_round + server_round
        self.handled.add(absolute)
        for failure in failures:
            self.tally.dropped.append(f"round {absolute}: {failure}")
            log.warning("round %d: a client dropped: %s", absolute, failure)
        problems = [p for _, res in results if (p := self.problem(res))]
        for problem in problems:
            self.tally.refused.append(f"round {absolute}: {problem}")
            log.warning("round %d: a client's update refused: %s", absolute, problem)
        mean, _ = super().aggregate_fit(server_round, results, []) if results else (None, {})
        weights = parameters_to_ndarrays(mean) if mean is not None else []
        sizes = [int(np.prod(shape)) for shape in self.shapes] + [1, 1]
        if problems or len(results) < self.min_clients or [w.size for w in weights] != sizes:
            self.tally.kept_rounds.append(absolute)
            log.warning("round %d: %d update(s), the head is kept", absolute, len(results))
            return None, {}
        # a client's weight not finite comes out of SecAgg+ as a large finite one: an
        # honest mean lies within the range every client's weights were clipped to
        if not all(np.isfinite(w).all() and np.abs(w).max() <= self.clip for w in weights):
            self.tally.kept_rounds.append(absolute)
            log.warning("round %d: the mean lies outside the clients' range: head kept", absolute)
            return None, {}
        *head, loss, count = weights
        self.tally.losses[absolute] = float(loss[0]) / LOSS_SCALE
        self.tally.examples[absolute] = round(float(count[0]) / COUNT_SCALE * len(results))
        return ndarrays_to_parameters(head), {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """After each round (the workflow's centralized evaluation): the server's state. A
        round SecAgg+ stopped (too few clients left for its threshold, or failures in its
        stages) never reached `aggregate_fit`: it is counted as a round that kept the head."""
        absolute = self.first_round + server_round
        if server_round > 0 and absolute not in self.handled:
            self.tally.kept_rounds.append(absolute)
            self.tally.dropped.append(f"round {absolute}: SecAgg+ stopped the round")
            log.warning("round %d: SecAgg+ stopped the round: the head is kept", absolute)
        weights = parameters_to_ndarrays(parameters)
        shaped = [Array(w.reshape(shape)) for w, shape in zip(weights, self.shapes, strict=True)]
        named = zip(self.names, shaped, strict=True)
        self.after(server_round, ArrayRecord(dict(named)))
        return None


def clipping_range(initial: ArrayRecord) -> float:
    """The range SecAgg+ quantizes the clients' weights in: ±4 × the largest weight of the
    federation's first head (at least ±8), the same after a resume."""
    return max(8.0, 4 * max(float(np.abs(a.numpy()).max()) for a in initial.values()))


def run_rounds(
    grid: Grid,
    context: Context,
    strategy: SecureMean,
    rounds: int,
    timeout: float,
    min_clients: int,
    sampled: int,
) -> None:
    """`rounds` rounds of SecAgg+ on `grid`: each client's key shared among all the round's
    clients, a majority of which (at least `min_clients` and 2, fewer than all) recover a
    dropped client's masks, so fewer colluding with the server cannot; the clients'
    weights quantized in `strategy.clip` to 2²² steps."""
    threshold = min(sampled - 1, max(2, min_clients, sampled // 2 + 1))
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=sampled,
            reconstruction_threshold=threshold,
            max_weight=1.0,
            clipping_range=strategy.clip,
            timeout=timeout,
        )
    )
    legacy = LegacyContext(
        context, config=ServerConfig(num_rounds=rounds, round_timeout=timeout), strategy=strategy
    )
    workflow(grid, legacy)
