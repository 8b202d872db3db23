"""Training the head across devices on Flower: each client trains on its own people's
histories and sends back only the head's weights; the server combines them.

A client (`client_app`) is a device, or in simulation a share of a task's users: asked to
train, it sets up exactly as central training does (`training.setup` on its own examples,
`resume` from its own checkpoint: optimizer, schedule, step and random states), takes the
server's head, trains `--local-steps` steps with `train_step`, saves its checkpoint and
replies with the head's trainable weights, its example count and its mean loss. No text,
history vector, key/value cache or gradient is in a reply: the centring mean comes from the
server, and the replies hold the weights under their parameter names and nothing else.

The server (`server_app`) runs one of Flower's strategies (FedAvg, FedProx, FedAdam; with
--dp-noise wrapped in Flower's client-side fixed-clipping differential privacy, its ε
accounted by Flower's RDP accountant) behind `Guard`, which refuses and logs a reply that
is malformed or of another head version and keeps the head when fewer than --min-clients
updates arrive. After each round the server's state (the head, the round, FedAdam's
moments, the privacy spent) is written to `federation.pt`, and a restarted run resumes
from it. `simulate` runs both on one machine (`flwr.simulation.run_simulation`),
`deployment` across machines (Flower's SuperLink and SuperNodes); either way the head then
goes through validation, export and attachment as a centrally trained one does.

With one client holding every example, the head is central training's with the same
steps (the server's mean of one head is that head), within float tolerance.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from edge_pllm.errors import InvalidInputError
from edge_pllm.files import atomic_write, private_dir
from edge_pllm.tasks.lamp import TaskSpec, task_spec

from .config import FederatedConfig, TrainConfig
from .data import Example
from .frozen import load_frozen_llm
from .model import PPlugHead
from .secure import (
    METRIC_KEYS,
    SecureMean,
    asks_legacy,
    clipping_range,
    is_secure,
    legacy_round,
    run_rounds,
    secure_when_asked,
)
from .training import (
    CHECKPOINT,
    Session,
    TrainResult,
    device_label,
    resume,
    save,
    setup,
    train_step,
)
from .validation import validate, validation_examples

STATE = "federation.pt"
ARRAYS, METRICS, HEAD = "arrays", "metrics", "head"  # the records of a reply
log = logging.getLogger("edge_pllm.federated")

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


# --- what a client shares ---------------------------------------------------------------------


def shared_names(head: PPlugHead) -> list[str]:
    """The head's trainable parameters: what the server sends and a client sends back
    (buffers, such as the centring mean, never leave a client)."""
    return [name for name, p in head.named_parameters() if p.requires_grad]


def head_arrays(head: PPlugHead) -> ArrayRecord:
    """The head's trainable weights as a Flower record (float32, in parameter order)."""
    params = dict(head.named_parameters())
    return ArrayRecord(
        {
            name: Array(params[name].detach().cpu().float().numpy().copy())
            for name in shared_names(head)
        }
    )


def load_arrays(head: PPlugHead, arrays: ArrayRecord) -> None:
    """Set the head's trainable weights from a record of exactly its names and shapes."""
    params = dict(head.named_parameters())
    names = shared_names(head)
    if list(arrays.keys()) != names:
        raise InvalidInputError(
            "The server's head has other weights than this client's: train with the same "
            "head settings and bundle.",
            field="arrays",
        )
    with torch.no_grad():
        for name in names:
            value = torch.from_numpy(np.array(arrays[name].numpy(), dtype=np.float32))
            params[name].copy_(value.view_as(params[name]))


def head_version(head: PPlugHead) -> str:
    """A fingerprint of the head's configuration and weight shapes: a reply for another
    head is refused. The LLM's embedding norm is left out: summed on another number of
    threads it differs in the last bits, and every client takes the server's."""
    params = dict(head.named_parameters())
    described = {
        "config": {**asdict(head.config), "embed_norm": None},
        "shapes": {n: list(params[n].shape) for n in shared_names(head)},
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


# --- which client holds whom ------------------------------------------------------------------


def owner_key(example: Example, split_by: str) -> str:
    """The person (question id) or the repository (its id's part before the last '-')."""
    return example.user if split_by == "person" else example.user.rsplit("-", 1)[0]


PLURAL = {"person": "people", "repository": "repositories"}


def partition(examples: Sequence[Example], clients: int, split_by: str) -> list[list[Example]]:
    """The examples shared out among `clients`: each person's (or repository's) on one
    client, the people dealt round-robin in sorted order (every client gets at least one)."""
    groups = sorted({owner_key(e, split_by) for e in examples})
    if len(groups) < clients:
        raise InvalidInputError(
            f"--federated-sim {clients} needs at least {clients} {PLURAL[split_by]} in the "
            f"training split; it has {len(groups)}. Simulate fewer clients.",
            field="federated_sim",
        )
    owner = {g: i % clients for i, g in enumerate(groups)}
    shares: list[list[Example]] = [[] for _ in range(clients)]
    for e in examples:
        shares[owner[owner_key(e, split_by)]].append(e)
    return shares


# --- the client -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientJob:
    """What a client is given (picklable: the simulation sends it to its workers): where the
    bundle and caches are, the run's settings, and the examples of each client it may be
    (a simulation's every share; a device its own, under its partition id)."""

    bundle: str
    home: str
    out: str
    task: str
    config: TrainConfig
    federation: FederatedConfig
    shares: dict[int, tuple[Example, ...]]

    def client_dir(self, client: int) -> Path:
        """Where client `client` keeps its checkpoint (a device: its own disk)."""
        return Path(self.out) / "clients" / str(client)


_frozen: dict[tuple[str, str | None], torch.nn.Module] = {}  # per worker process


def _frozen_llm(job: ClientJob) -> torch.nn.Module:
    """The frozen LLM, loaded once per worker process for every client it runs."""
    from edge_pllm.inference.bundle import load_bundle

    key = (job.bundle, job.config.llm_source)
    if key not in _frozen:
        source = Path(job.config.llm_source) if job.config.llm_source else None
        _frozen[key] = load_frozen_llm(load_bundle(job.bundle), source)
    return _frozen[key]


class ClientFailed(RuntimeError):
    """What a failed client tells the server: the kind of error, never its text (which
    may quote the client's data); the client's own log has the rest."""


# errors about what the server sent, told to it whole
TOLD = frozenset({"head_version", "task", "steps", "arrays", "secure_aggregation"})


def client_round(job: ClientJob, client: int, message: Message, context: Context) -> Message:
    """One round on client `client` (see `train_round`; under secure aggregation in
    SecAgg+'s legacy dialect, `secure.legacy_round`). The server is told an error about
    what it sent as it is (the head, the task, the steps: no data in them), any other by
    its kind and setting only (its text could name the client's folders or quote its
    data); the client's own log has the rest."""
    try:
        if job.federation.secure_aggregation and not is_secure(message):
            raise InvalidInputError(
                "This federation trains with --secure-aggregation: the server asked for a "
                "head outside SecAgg+, and this client does not send one unmasked.",
                field="secure_aggregation",
            )
        if asks_legacy(message):
            return legacy_round(
                message, context, lambda weights, sent: train_on(job, client, weights, sent)
            )
        return train_round(job, client, message)
    except InvalidInputError as exc:
        if exc.field in TOLD:
            raise
        log.exception("client %d failed", client)
        raise ClientFailed(
            f"client {client} failed with {type(exc).__name__} in its {exc.field} (its own "
            "log says why)"
        ) from None
    except Exception as exc:
        log.exception("client %d failed", client)  # on the client: its own log
        raise ClientFailed(
            f"client {client} failed with {type(exc).__name__} (its own log says why)"
        ) from None


def _round_dir(root: Path, number: int) -> Path:
    return root / f"round-{number}"


def _newest_before(root: Path, number: int) -> int:
    """The newest round before `number` whose checkpoint this client kept (0: none)."""
    done = [
        int(p.name.split("-", 1)[1])
        for p in root.glob("round-*")
        if p.name.split("-", 1)[1].isdigit() and (p / CHECKPOINT).is_file()
    ]
    return max([r for r in done if r < number], default=0)


def train_round(job: ClientJob, client: int, message: Message) -> Message:
    """One round of the Message API (see `train_on`): the reply holds the head's weights,
    its metrics and its version, nothing else."""
    arrays, metrics, version = train_on(
        job, client, message.content["arrays"], message.content["config"]
    )
    reply = RecordDict({ARRAYS: arrays, METRICS: metrics, HEAD: ConfigRecord({"version": version})})
    return Message(content=reply, reply_to=message)


def train_on(
    job: ClientJob,
    client: int,
    weights: ArrayRecord | Sequence[np.ndarray],
    sent: Mapping[str, Any],
) -> tuple[ArrayRecord, MetricRecord, str]:
    """Set up as central training does, resume this client's checkpoint of its newest
    round before this one (a round trained again after a cut starts where it started),
    take the server's head (`weights`: by name, or in parameter order) and the settings it
    `sent`, train --local-steps steps and save this round's checkpoint. Returns the head's
    weights, the metrics (example count, passes, mean loss) and the head's version."""
    examples = list(job.shares[client])
    # each client its own random stream; client 0's is central training's
    config = replace(job.config, seed=job.config.seed + client)
    root = job.client_dir(client)
    number = int(sent["server-round"])
    before = _newest_before(root, number)
    session = setup(
        job.bundle, examples, task_spec(job.task), config, Path(job.home), progress=False,
        llm=_frozen_llm(job),
    )  # fmt: skip
    resume(session, _round_dir(root, before))  # round 0 is never written: a fresh start
    if sent.get("task", job.task) != job.task:
        raise InvalidInputError(
            f"The server trains task {sent['task']}; this client's examples are of {job.task}.",
            field="task",
        )
    version = head_version(session.head)
    if sent["head-version"] != version:
        raise InvalidInputError(
            f"The server trains head {sent['head-version']}; this client's is {version}.",
            field="head_version",
        )
    if not isinstance(weights, ArrayRecord):
        names = shared_names(session.head)
        if len(weights) != len(names):
            raise InvalidInputError(
                f"The server sent {len(weights)} weights; this client's head has "
                f"{len(names)}: train with the same head settings and bundle.",
                field="arrays",
            )
        pairs = zip(names, weights, strict=True)
        weights = ArrayRecord({n: Array(np.asarray(w)) for n, w in pairs})
    load_arrays(session.head, weights)
    with torch.no_grad():  # the server's buffers: the centring mean, the embedding norm
        given = sent["history-mean"]  # a list, or float32 bytes (SecAgg+'s legacy config)
        if isinstance(given, bytes):
            mean = torch.tensor(np.frombuffer(given, dtype=np.float32).copy())
        else:
            mean = torch.tensor(np.asarray(given, dtype=np.float32))
        session.head.history_mean.copy_(mean.to(session.head.history_mean.device))
        session.head.embed_norm.fill_(float(sent["embed-norm"]))
    mu = float(sent.get("proximal-mu", 0.0))  # FedProx's configure_train sends it
    if mu > 0:
        anchor = {n: p.detach().clone() for n, p in session.head.named_parameters()}

        def proximal() -> torch.Tensor:
            terms = [
                ((p - anchor[n]) ** 2).sum()
                for n, p in session.head.named_parameters()
                if p.requires_grad
            ]
            return mu / 2 * torch.stack(terms).sum()

        session.penalty = proximal
    if session.step >= config.steps:
        raise InvalidInputError(
            f"Client {client} has trained all its {config.steps} steps.", field="steps"
        )
    started, first = time.perf_counter(), len(session.losses)
    session.head.train()
    target = min(config.steps, session.step + job.federation.local_steps)
    while session.step < target:
        train_step(session)
    folder = _round_dir(root, number)
    private_dir(folder)
    save(session, folder, session.seconds + time.perf_counter() - started)
    for old in root.glob("round-*"):  # this round's and the one it started from are kept
        suffix = old.name.split("-", 1)[1]
        if suffix.isdigit() and int(suffix) not in (number, before):
            shutil.rmtree(old, ignore_errors=True)
    losses = session.losses[first:]
    metrics = MetricRecord(
        {
            METRIC_KEYS[0]: len(examples),
            METRIC_KEYS[1]: len(losses) * config.batch_size,
            METRIC_KEYS[2]: float(np.mean(losses)),
        }
    )
    return head_arrays(session.head), metrics, version


def client_app(job: ClientJob, mods: Sequence[Mod] = ()) -> ClientApp:
    """The Flower client for `job`; `mods` wrap it (outermost first), and with differential
    privacy Flower's `fixedclipping_mod` clips each update on the client."""
    dp = [fixedclipping_mod] if job.federation.dp_noise else []
    app = ClientApp(mods=[*mods, secure_when_asked, *dp])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return client_round(job, int(context.node_config["partition-id"]), message, context)

    return app


# --- the server -------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the server saw: updates refused (malformed, another head) and clients that
    dropped (an error instead of a reply), per round; each round's mean client loss and
    the examples its clients hold."""

    refused: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    kept_rounds: list[int] = field(default_factory=list)  # too few updates: head unchanged
    losses: dict[int, float] = field(default_factory=dict)
    examples: dict[int, int] = field(default_factory=dict)


class Guard(Strategy):
    """A Flower strategy around another: replies of another head version, with other
    weights, shapes or types, non-finite values, or without a positive example count are
    refused and logged; fewer than `min_clients` good updates keep the head."""

    def __init__(
        self,
        inner: Strategy,
        expected: ArrayRecord,
        version: str,
        passes: int,
        min_clients: int,
        tally: Tally,
        first_round: int = 0,
    ) -> None:
        super().__init__()
        self.inner, self.version, self.min_clients, self.tally = inner, version, min_clients, tally
        self.shapes = {k: (tuple(a.shape), a.dtype) for k, a in expected.items()}
        self.passes = passes  # examples a client trains on in a round
        self.first_round = first_round  # rounds done before a resume
        self.asked: dict[int, int] = {}  # clients asked, per round

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # The inner strategy sees the federation's round (FedAdam's bias correction counts
        # it), and so do the clients (their checkpoints are kept by round).
        absolute = self.first_round + server_round
        messages = list(self.inner.configure_train(absolute, arrays, config, grid))
        self.asked[absolute] = len(messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> None:
        return None

    def problem(self, content: RecordDict) -> str | None:
        """What is wrong with a reply's content (None: a well-formed update)."""
        if set(content.keys()) != {ARRAYS, METRICS, HEAD}:
            return f"records {sorted(content.keys())}, not {sorted((ARRAYS, METRICS, HEAD))}"
        head = content[HEAD]
        if not isinstance(head, ConfigRecord) or head.get("version") != self.version:
            found = head.get("version") if isinstance(head, ConfigRecord) else None
            return f"head version {found!r}, not {self.version!r}"
        arrays = content[ARRAYS]
        if not isinstance(arrays, ArrayRecord) or list(arrays.keys()) != list(self.shapes):
            return "weights of another head (other names or order)"
        for name, (shape, dtype) in self.shapes.items():
            array = arrays[name]
            if tuple(array.shape) != shape or array.dtype != dtype:
                return f"{name}: {array.dtype}{list(array.shape)}, not {dtype}{list(shape)}"
            if not np.isfinite(array.numpy()).all():
                return f"{name}: values that are not finite"
        metrics = content[METRICS]
        if not isinstance(metrics, MetricRecord) or set(metrics.keys()) != set(METRIC_KEYS):
            found = sorted(metrics.keys()) if isinstance(metrics, MetricRecord) else None
            return f"metrics {found}, not {sorted(METRIC_KEYS)}"
        count, passes, loss = (metrics[k] for k in METRIC_KEYS)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 < count < 10**9:
            return f"example count {count!r}"
        if passes != self.passes:
            return f"{passes!r} examples trained on, not {self.passes}"
        if not isinstance(loss, float | int) or not math.isfinite(loss):
            return f"loss {loss!r}"
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        absolute = self.first_round + server_round
        replies = list(replies)
        if len(replies) < self.asked.get(absolute, 0):
            missing = self.asked[absolute] - len(replies)
            self.tally.dropped.append(f"round {absolute}: {missing} client(s) did not answer")
            log.warning("round %d: %d client(s) did not answer in time", absolute, missing)
        good = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.tally.dropped.append(f"round {absolute}, node {node}: {reply.error.reason}")
                log.warning("round %d: node %d dropped: %s", absolute, node, reply.error.reason)
                continue
            problem = self.problem(reply.content)
            if problem:
                self.tally.refused.append(f"round {absolute}, node {node}: {problem}")
                log.warning("round %d: update of node %d refused: %s", absolute, node, problem)
                continue
            good.append(reply)
        if len(good) < self.min_clients:
            self.tally.kept_rounds.append(absolute)
            log.warning(
                "round %d: %d good update(s), fewer than --min-clients %d: the head is kept",
                absolute, len(good), self.min_clients,
            )  # fmt: skip
            return None, None
        self.tally.examples[absolute] = sum(int(r.content[METRICS][METRIC_KEYS[0]]) for r in good)
        arrays, metrics = self.inner.aggregate_train(absolute, good)
        if arrays is None:  # differential privacy releases a round only if all answered
            self.tally.kept_rounds.append(absolute)
            log.warning("round %d: no update released: the head is kept", absolute)
            return None, None
        if metrics is not None and "train-loss" in metrics:
            self.tally.losses[absolute] = float(metrics["train-loss"])
        return arrays, metrics


@dataclass(frozen=True)
class ServerJob:
    """What the server is given: the settings, the first head, the centring mean every
    client uses, the head's version, and where it keeps its state."""

    federation: FederatedConfig
    rounds: int
    clients: int
    initial: ArrayRecord
    history_mean: list[float]
    embed_norm: float
    version: str
    out: str
    settings: dict[str, Any]  # what decides the federation's head: a resume keeps them
    passes: int  # examples a client trains on in a round
    on_round: Callable[[int, Tally], None] | None = None
    task: str = ""  # the task every client trains


def _strategy(fed: FederatedConfig, clients: int) -> tuple[Strategy, Any]:
    """Flower's strategy for the settings, and its privacy accountant (None without DP)."""
    sampled = fed.sampled()
    common: dict[str, Any] = {
        "fraction_train": fed.fraction,
        "fraction_evaluate": 0.0,
        "min_train_nodes": sampled,
        "min_available_nodes": clients,
        # under DP every client weighs the same (Flower's accounting needs it): the steps
        "weighted_by_key": "passes" if fed.dp_noise else "num-examples",
    }
    if fed.strategy == "fedprox":
        inner: Strategy = FedProx(proximal_mu=fed.proximal_mu, **common)
    elif fed.strategy == "fedadam":
        inner = FedAdam(eta=fed.server_lr, **common)
    else:
        inner = FedAvg(**common)
    if not fed.dp_noise:
        return inner, None
    from flwr.supercore.privacy_accounting import (
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=fed.dp_delta,
            population_size=clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    dp = DifferentialPrivacyClientSideFixedClipping(
        inner, fed.dp_noise, fed.dp_clip, sampled, accountant=accountant
    )
    return dp, accountant


def _optimizer_state(strategy: Strategy) -> dict[str, Any]:
    """FedAdam's moments (kept across a restart); nothing for a plain mean."""
    inner = getattr(strategy, "strategy", strategy)
    return {k: getattr(inner, k) for k in ("m_t", "v_t") if getattr(inner, k, None) is not None}


def read_state(out: Path) -> dict[str, Any] | None:
    """The server's state after its last round (None before the first)."""
    path = out / STATE
    return torch.load(path, weights_only=False) if path.is_file() else None


def run_server(job: ServerJob, grid: Grid, context: Context) -> None:
    """The federation's rounds from where its state says (all, on a fresh start)."""
    out = Path(job.out)
    state = read_state(out)
    strategy, accountant = _strategy(job.federation, job.clients)
    done, arrays, tally = 0, job.initial, Tally()
    if state is not None:
        saved = {**state.get("settings", {}), "head": state["version"]}
        now = {**job.settings, "head": job.version}
        changed = sorted(k for k in now if saved.get(k) != now[k])
        if changed:
            said = ", ".join(f"{k} {saved.get(k)!r} (now {now[k]!r})" for k in changed)
            raise InvalidInputError(
                f"{out / STATE} is of a federation trained with {said}: resume with the "
                "settings it was trained with, or train into another folder.",
                field="out_dir",
            )
        done, tally = state["round"], state["tally"]
        if not hasattr(tally, "examples"):  # a state written before tallies counted them
            tally.examples = {}
        arrays = ArrayRecord({k: Array(v) for k, v in state["arrays"].items()})
        inner = getattr(strategy, "strategy", strategy)
        for key, value in state.get("optimizer", {}).items():
            setattr(inner, key, value)
        if accountant is not None and state.get("privacy"):
            accountant.load_state_dict(state["privacy"])
    if done >= job.rounds:
        return
    earlier = state.get("seconds", 0.0) if state else 0.0
    began = time.perf_counter()
    config: dict[str, Any] = {
        "task": job.task,
        "head-version": job.version,
        "history-mean": job.history_mean,
        "embed-norm": job.embed_norm,
    }

    def after(server_round: int, now: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        absolute = done + server_round
        saved = {
            "version": job.version,
            "rounds": job.rounds,
            "round": absolute,
            "arrays": {k: np.array(a.numpy()) for k, a in now.items()},
            "tally": tally,
            "optimizer": _optimizer_state(strategy),
            "privacy": accountant.state_dict() if accountant is not None else None,
            "epsilon": accountant.get_privacy_spent().epsilon if accountant else None,
            "settings": job.settings,
            "seconds": earlier + time.perf_counter() - began,  # every run's rounds
        }
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        atomic_write(out / STATE, buffer.getvalue())
        if job.on_round:
            job.on_round(absolute, tally)
        return None

    fed = job.federation
    if fed.secure_aggregation:
        secure = SecureMean(
            initial=arrays, config=config, version=job.version, passes=job.passes,
            sampled=fed.sampled(), clients=job.clients, fraction=fed.fraction,
            min_clients=fed.min_clients, first_round=done, tally=tally, after=after,
            clip=clipping_range(job.initial),
        )  # fmt: skip
        run_rounds(
            grid, context, secure, job.rounds - done, fed.round_timeout, fed.min_clients,
            fed.sampled(),
        )  # fmt: skip
        return
    guard = Guard(strategy, job.initial, job.version, job.passes, fed.min_clients, tally, done)
    guard.start(
        grid,
        arrays,
        num_rounds=job.rounds - done,
        timeout=job.federation.round_timeout,
        train_config=ConfigRecord(config),
        evaluate_fn=after,
    )


def server_app(job: ServerJob) -> ServerApp:
    """The Flower server for `job`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(job, grid, context)

    return app


# --- one machine ------------------------------------------------------------------------------


@dataclass
class Federation:
    """What a simulated federation did, as the head's manifest entry records it."""

    clients: int
    rounds: int
    update_bytes: int  # the weights of one reply as Flower counts them (float32, with names)
    seconds: float
    tally: Tally
    epsilon: float | None = None
    runtime: str = "simulation"  # or "deployment": Flower's SuperLink and SuperNodes

    @property
    def client_examples(self) -> int:
        """The most examples a round's clients held (each client says its own count)."""
        return max(getattr(self.tally, "examples", {}).values(), default=0)

    def as_dict(self, fed: FederatedConfig) -> dict[str, Any]:
        out: dict[str, Any] = {
            "runtime": self.runtime,
            "clients": self.clients,
            "rounds": self.rounds,
            "strategy": fed.strategy,
            **({"split_by": fed.split_by} if self.runtime == "simulation" else {}),
            "client_examples": self.client_examples,
            "update_bytes": self.update_bytes,
            "rounds_per_hour": round(self.rounds / self.seconds * 3600, 1) if self.seconds else 0,
            "refused": len(self.tally.refused),
            "dropped": len(self.tally.dropped),
            "rounds_kept": self.tally.kept_rounds,
        }
        if fed.secure_aggregation:
            out["secure_aggregation"] = "SecAgg+"
        if fed.dp_noise:
            out["dp"] = {
                "noise_multiplier": fed.dp_noise,
                "clipping_norm": fed.dp_clip,
                "epsilon": self.epsilon,
                "delta": fed.dp_delta,
            }
        return out


@dataclass
class Start:
    """The server's start: the session its first head and centring mean come from (its
    frozen LLM validates the head at the end), the job its rounds run, and the settings."""

    session: Session
    job: ServerJob
    config: TrainConfig
    setup_seconds: float


def start_server(
    bundle_dir: str | Path,
    examples: list[Example],
    spec: TaskSpec,
    out_dir: str | Path,
    config: TrainConfig,
    fed: FederatedConfig,
    home_dir: Path,
    validation: Sequence[Example] = (),
    log_line: Callable[[str], None] | None = None,
) -> Start:
    """Set the server up as central training starts (`setup` on `examples`, without the
    keys and values only training needs): the first head, its version and the centring mean
    every client uses; the server's state goes to `out_dir`."""
    fed.check_with(config)
    clients = fed.federated_sim or 1
    rounds = fed.rounds(config.steps)
    out = Path(out_dir)
    private_dir(out)
    started = time.perf_counter()
    session = setup(
        bundle_dir, examples, spec, config, home_dir, validation, progress=log_line is not None,
        log=log_line, trains=False,
    )  # fmt: skip

    def on_round(number: int, tally: Tally) -> None:
        if log_line:
            loss = tally.losses.get(number)
            said = f", clients' loss {loss:.3f}" if loss is not None else ", head kept"
            log_line(f"round {number}/{rounds}{said}")

    settings = {
        **{k: v for k, v in asdict(fed).items() if k != "round_timeout"},
        **config.decisive(),
    }
    job = ServerJob(
        fed, rounds, clients, head_arrays(session.head), session.head.history_mean.cpu().tolist(),
        float(session.head.embed_norm), head_version(session.head), str(out), settings,
        fed.local_steps * config.batch_size, on_round, spec.name,
    )  # fmt: skip
    return Start(session, job, config, time.perf_counter() - started)


def conclude(
    start: Start,
    runtime: str,
    validation: Sequence[Example] = (),
    log_line: Callable[[str], None] | None = None,
) -> tuple[PPlugHead, TrainResult, Federation]:
    """The federation's head from the server's state after its rounds, validated on
    `validation` as central training's is, on the CPU; an error if the rounds did not all
    run or none took an update. `runtime`: simulation or deployment."""
    job, session, config = start.job, start.session, start.config
    where = f"{job.clients} {'simulated clients' if runtime == 'simulation' else 'devices'}"
    fed, rounds = job.federation, job.rounds
    state = read_state(Path(job.out))
    if state is None or state["version"] != job.version:
        raise InvalidInputError(
            "The federation ended without a round: see the log above for why the clients "
            "failed (each client's error is logged).",
            field="federated_sim",
        )
    if state["round"] < rounds:
        raise InvalidInputError(
            f"The federation stopped after round {state['round']} of {rounds} (see the log "
            "above): run the same command again to go on from there.",
            field="federated_sim",
        )
    tally: Tally = state["tally"]
    if len(tally.kept_rounds) >= rounds:
        raise InvalidInputError(
            f"No round of the {rounds} took an update: every client failed or was refused "
            "(see the log above).",
            field="federated_sim",
        )
    load_arrays(session.head, ArrayRecord({k: Array(v) for k, v in state["arrays"].items()}))
    seconds = float(state.get("seconds") or 0.0)  # every run's rounds
    trained = (rounds - len(tally.kept_rounds)) * fed.sampled() * job.passes
    checked = None
    if validation:
        checked = validate(
            session.head, session.llm, validation_examples(validation), session.encode,
            session.table, session.query_inputs, session.embed_scale,
        )  # fmt: skip
        if log_line:
            log_line(checked.summary())
    session.head.eval().cpu()
    losses = [tally.losses[r] for r in sorted(tally.losses)]
    result = TrainResult(
        config.steps,
        seconds,
        (losses[-1:] or [float("nan")])[0],
        losses,
        f"{device_label(session.device)} × {where}",
        checked,
        examples_per_hour=trained / seconds * 3600 if seconds > 0 else 0.0,
        setup_seconds=start.setup_seconds,
    )
    federation = Federation(
        job.clients,
        rounds,
        job.initial.count_bytes(),
        seconds,
        tally,
        state.get("epsilon"),
        runtime,
    )
    return session.head, result, federation


def simulate(
    bundle_dir: str | Path,
    examples: list[Example],
    spec: TaskSpec,
    out_dir: str | Path,
    config: TrainConfig,
    fed: FederatedConfig,
    home_dir: Path,
    validation: Sequence[Example] = (),
    log_line: Callable[[str], None] | None = None,
    mods: Sequence[Mod] = (),
) -> tuple[PPlugHead, TrainResult, Federation]:
    """Train a head with `fed.federated_sim` simulated clients sharing `examples` out
    (`partition`), on Flower's simulation engine; resumes from `out_dir`. The server's
    first head and centring mean are those central training starts from (`setup` on every
    example: in a simulation the data are public); the returned head is validated on
    `validation` as central training's is, and is on the CPU."""
    import ray  # noqa: F401  (Flower's engine: missing, it is said before any setup)
    from flwr.simulation import run_simulation

    if fed.dp_noise:
        import dp_accounting  # noqa: F401  (Flower's accountant reads ε with it)
    fed.check_with(config)
    clients = fed.federated_sim or 1
    shares = partition(examples, clients, fed.split_by)
    start = start_server(
        bundle_dir, examples, spec, out_dir, config, fed, home_dir, validation, log_line
    )
    threads = config.threads or max(1, (os.cpu_count() or 1) // min(clients, os.cpu_count() or 1))
    client_job = ClientJob(
        str(bundle_dir), str(home_dir), start.job.out, spec.name,
        replace(config, threads=threads), fed, {n: tuple(s) for n, s in enumerate(shares)},
    )  # fmt: skip
    # On a GPU the clients share it (Ray hides it from a worker that asks for none).
    gpus = 1.0 / clients if start.session.device.type == "cuda" else 0.0
    if log_line:
        log_line(
            f"federation: {clients} clients ({', '.join(str(len(s)) for s in shares)} "
            f"examples), {start.job.rounds} rounds of {fed.local_steps} steps, {fed.strategy}"
        )
    # Flower's own warnings (run_simulation's deprecation, evaluation skipped) say nothing
    # about this run; a client's failure is an error, and Guard says what it refused.
    with quiet_flower():
        run_simulation(
            server_app=server_app(start.job),
            client_app=client_app(client_job, mods),
            num_supernodes=clients,
            backend_config={
                "client_resources": {"num_cpus": threads, "num_gpus": gpus},
                "init_args": {"num_cpus": max(threads, os.cpu_count() or 1)},
            },
        )
    return conclude(start, "simulation", validation, log_line)


@contextmanager
def quiet_flower() -> Iterator[None]:
    """Flower's log at errors only, for the block."""
    flower = logging.getLogger("flwr")
    level = flower.level
    flower.setLevel(logging.ERROR)
    try:
        yield
    finally:
        flower.setLevel(level)


__all__ = [
    "ClientJob",
    "Federation",
    "Guard",
    "ServerJob",
    "Start",
    "Tally",
    "client_app",
    "client_round",
    "conclude",
    "head_arrays",
    "head_version",
    "load_arrays",
    "partition",
    "server_app",
    "simulate",
    "start_server",
]
