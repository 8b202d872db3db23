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


def legacy_round(message: Message, context: Context, train: Train) -> Message:
    """The round's training in SecAgg+'s dialect: `train(weights, config)` on the
    `FitIns`, its result as a `FitRes` of weight 1, refused when a weight lies outside the
    range SecAgg+ quantizes (it would be clipped silently)."""
    fitins: FitIns = compat.recorddict_to_fitins(message.content, keep_input=True)
    arrays, metrics, version = train(parameters_to_ndarrays(fitins.parameters), fitins.config)
    weights = [np.atleast_1d(a.numpy()) for a in arrays.values()]  # SecAgg+ garbles 0-d
    state = context.state.config_records.get(RECORD_KEY_STATE)
    limit = float(state["clipping_range"]) if state and "clipping_range" in state else math.inf
    largest = max(float(np.abs(w).max()) for w in weights)
    if largest > limit:
        raise InvalidInputError(
            f"A weight of the trained head is {largest:.3g}, outside secure aggregation's "
            f"range ±{limit:g}: train with a lower --lr or without --secure-aggregation.",
            field="secure_aggregation",
        )
    said: dict[str, Scalar] = {**dict(metrics), "version": version}
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
    ) -> None:
        self.initial = initial
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

    def problem(self, metrics: Mapping[str, Any]) -> str | None:
        if metrics.get("version") != self.version:
            return f"head version {metrics.get('version')!r}, not {self.version!r}"
        if metrics.get("passes") != self.passes:
            return f"{metrics.get('passes')!r} examples trained on, not {self.passes}"
        loss = metrics.get("train-loss")
        if not isinstance(loss, float | int) or not math.isfinite(loss):
            return f"loss {loss!r}"
        return None

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        absolute = self.first_round + server_round
        for failure in failures:
            self.tally.dropped.append(f"round {absolute}: {failure}")
            log.warning("round %d: a client dropped: %s", absolute, failure)
        problems = [p for _, res in results if (p := self.problem(res.metrics))]
        for problem in problems:
            self.tally.refused.append(f"round {absolute}: {problem}")
            log.warning("round %d: a client's update refused: %s", absolute, problem)
        mean, _ = super().aggregate_fit(server_round, results, []) if results else (None, {})
        weights = parameters_to_ndarrays(mean) if mean is not None else []
        sizes = [int(np.prod(shape)) for shape in self.shapes]
        shapes_ok = [w.size for w in weights] == sizes
        if problems or len(results) < self.min_clients or not shapes_ok:
            self.tally.kept_rounds.append(absolute)
            log.warning("round %d: %d update(s), the head is kept", absolute, len(results))
            return None, {}
        if not all(np.isfinite(w).all() for w in weights):
            self.tally.kept_rounds.append(absolute)
            log.warning("round %d: the mean has values that are not finite: head kept", absolute)
            return None, {}
        losses = [float(res.metrics["train-loss"]) for _, res in results]
        self.tally.losses[absolute] = float(np.mean(losses))
        self.tally.examples[absolute] = sum(int(res.metrics["num-examples"]) for _, res in results)
        return mean, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """After each round (the workflow's centralized evaluation): the server's state."""
        weights = parameters_to_ndarrays(parameters)
        shaped = [Array(w.reshape(shape)) for w, shape in zip(weights, self.shapes, strict=True)]
        named = zip(self.names, shaped, strict=True)
        self.after(server_round, ArrayRecord(dict(named)))
        return None


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
    clients, any `min_clients` (at least 2, fewer than all) of which recover a dropped
    client's masks; the clients' weights quantized in ±`strategy`'s largest weight × 4
    (at least ±8) to 2²² steps."""
    largest = max(float(np.abs(a.numpy()).max()) for a in strategy.initial.values())
    threshold = min(max(2, min_clients), sampled - 1)
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=sampled,
            reconstruction_threshold=threshold,
            max_weight=1.0,
            clipping_range=max(8.0, 4 * largest),
            timeout=timeout,
        )
    )
    legacy = LegacyContext(
        context, config=ServerConfig(num_rounds=rounds, round_timeout=timeout), strategy=strategy
    )
    workflow(grid, legacy)
