"""The federation across machines, on Flower's deployment runtime: the Flower App that
`flwr run federation/ SUPERLINK` starts on a SuperLink (the server) and its SuperNodes
(the devices), with the same client and server as `train-plug --federated-sim`.

The run config (`federation/pyproject.toml`, overridden with `flwr run --run-config`) says
what the whole federation trains: `options`, train-plug's own options as one string
(checked as the command checks them), the number of `clients` to wait for, and the
server's side: `task-dir`, a LaMP-format folder the server may read (public data: the first
head's centring mean comes from its training splits, and --validate's people check the
head), its `home`, `bundle` and `out`, and whether to `attach` the head to the bundle.

Each SuperNode's node config (`flower-supernode --node-config`) says where the device keeps
what never leaves it: `task-dir`, its people's histories as a LaMP-format folder, and its
`home`, `bundle` and `out` (its checkpoints); an optional `partition-id` numbers the device
(its random stream). The device trains on `options`' training splits of its own folder and
replies with the head's weights alone, as a simulated client does.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid, ServerApp

from edge_pllm.defaults import ensure_default_bundle
from edge_pllm.errors import InvalidInputError
from edge_pllm.paths import home as edge_home

from .config import FederatedConfig, TrainConfig, configs_from_words, option_words
from .data import task_examples
from .federated import ClientJob, client_round, conclude, run_server, start_server
from .onnx import publish
from .secure import secure_when_asked

APP_DIR = "federation"  # the Flower App's folder in the repository


@dataclass(frozen=True)
class RunSettings:
    """The run config: what `flwr run` gives the server and every client (the defaults are
    those of `federation/pyproject.toml`'s [tool.flwr.app.config], which a test checks)."""

    options: str = ""
    clients: int = 2
    task_dir: str = ""
    home: str = ""
    bundle: str = ""
    out: str = ""
    attach: bool = True

    @classmethod
    def of(cls, run: Mapping[str, Any]) -> RunSettings:
        """The settings from a run config (keys spelled with dashes, as TOML keys are)."""
        names = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        unknown = sorted(set(run) - set(names))
        if unknown:
            raise InvalidInputError(
                f"The run config has keys this app does not know: {', '.join(unknown)} "
                f"(it knows {', '.join(names)}).",
                field="run_config",
            )
        settings = cls(**{names[k]: v for k, v in run.items()})
        if settings.clients < 1:
            raise InvalidInputError(
                f"clients must be at least 1 (got {settings.clients}).", field="clients"
            )
        return settings

    def configs(self) -> tuple[TrainConfig, FederatedConfig]:
        """train-plug's settings from `options`, the federation's clients those it waits for."""
        config, fed = configs_from_words(shlex.split(self.options), TrainConfig, FederatedConfig)
        if fed.federated_sim:
            raise InvalidInputError(
                "--federated-sim is for one machine: a deployed federation's clients are its "
                "SuperNodes; set their number with the run config's clients.",
                field="federated_sim",
            )
        return config, replace(fed, federated_sim=self.clients)

    def command(self, app: str = APP_DIR) -> str:
        """The `flwr run` command that trains this federation's head again: every option
        spelled out, so a later change of a default does not change what it reproduces."""
        config, fed = self.configs()
        words = option_words(config) + option_words(replace(fed, federated_sim=None))
        pairs = [
            f"{f.name.replace('_', '-')}={_toml(v)}"
            for f in fields(self)
            if (v := shlex.join(words) if f.name == "options" else getattr(self, f.name))
            != f.default
            or f.name in ("options", "clients", "task_dir")
        ]
        return shlex.join(["flwr", "run", app, "SUPERLINK", "--run-config", " ".join(pairs)])


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def _home(given: str) -> Path:
    return edge_home(given or None)


def _bundle(given: str, home_dir: Path) -> Path:
    return Path(given) if given else ensure_default_bundle(home_dir)


def _folder(given: Any, what: str) -> Path:
    if not given or not Path(str(given)).is_dir():
        raise InvalidInputError(
            f"{what} must name a LaMP-format task folder (got {given!r}).", field="task_dir"
        )
    return Path(str(given))


# --- the device -------------------------------------------------------------------------------


def device_job(context: Context) -> tuple[ClientJob, int]:
    """This SuperNode's client: the run's settings, the device's own examples, and its
    number (its node config's partition-id, else 0)."""
    config, fed = RunSettings.of(context.run_config).configs()
    node = context.node_config
    unknown = sorted(set(node) - {"task-dir", "home", "bundle", "out", "partition-id"})
    if unknown:
        raise InvalidInputError(
            f"The node config has keys a device does not use: {', '.join(unknown)} (it reads "
            "task-dir, home, bundle, out and partition-id).",
            field="node_config",
        )
    task_dir = _folder(node.get("task-dir"), "The node config's task-dir")
    home_dir = _home(str(node.get("home", "")))
    bundle = _bundle(str(node.get("bundle", "")), home_dir)
    spec, examples, _ = task_examples(task_dir, replace(config, validate=None))
    number = int(node.get("partition-id", 0))
    out = str(node.get("out") or home_dir / "plug-federated")
    job = ClientJob(
        str(bundle), str(home_dir), out, spec.name, config, fed, {number: tuple(examples)}
    )
    return job, number


def clip_when_private(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side clipping when the run trains with differential privacy."""
    _, fed = RunSettings.of(context.run_config).configs()
    if fed.dp_noise:
        return fixedclipping_mod(message, context, call_next)
    return call_next(message, context)


client = ClientApp(mods=[secure_when_asked, clip_when_private])


@client.train()
def _train(message: Message, context: Context) -> Message:
    job, number = device_job(context)
    return client_round(job, number, message, context)


# --- the server -------------------------------------------------------------------------------


def run_federation(grid: Grid, context: Context) -> Path:
    """The server's whole run: set up from its own task folder, run the rounds on `grid`,
    then validate, export and attach the head as train-plug does; returns the output folder."""
    settings = RunSettings.of(context.run_config)
    config, fed = settings.configs()
    fed.check_with(config)
    fed.rounds(config.steps)
    task_dir = _folder(settings.task_dir, "The run config's task-dir (the server's own data)")
    home_dir = _home(settings.home)
    bundle = _bundle(settings.bundle, home_dir)
    out = Path(settings.out) if settings.out else home_dir / "plug-federated"
    spec, examples, held_out = task_examples(task_dir, config)
    say = _say
    say(
        f"server: the first head from {len(examples)} examples of its own; waiting for "
        f"{fed.federated_sim} clients"
    )
    start = start_server(bundle, examples, spec, out, config, fed, home_dir, held_out, say)
    run_server(start.job, grid, context)
    head, result, federation = conclude(start, "deployment", held_out, say)
    publish(
        head,
        bundle,
        out,
        task=spec.name,
        examples=federation.client_examples,
        config=config,
        result=result,
        command=settings.command(),
        federation=federation.as_dict(fed),
        attach=settings.attach,
        say=say,
    )
    return out


def _say(line: str) -> None:
    print(line, flush=True)  # the ServerApp's output is what `flwr run --stream` shows


server = ServerApp()


@server.main()
def _main(grid: Grid, context: Context) -> None:
    run_federation(grid, context)


__all__ = ["APP_DIR", "RunSettings", "client", "device_job", "run_federation", "server"]
