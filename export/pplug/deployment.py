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

import functools
import hashlib
import json
import logging
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
from .federated import ClientFailed, ClientJob, client_round, conclude, run_server, start_server
from .onnx import publish
from .secure import secure_when_asked

APP_DIR = "federation"  # the Flower App's folder in the repository
log = logging.getLogger("edge_pllm.federated")


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
        """The settings from a run config (keys spelled with dashes, as TOML keys are),
        each of its default's type."""
        names = {f.name.replace("_", "-"): f for f in fields(cls)}
        _check_keys("run config", run, {k: type(f.default) for k, f in names.items()})
        settings = cls(**{names[k].name: v for k, v in run.items()})
        if settings.clients < 1:
            raise InvalidInputError(
                f"clients must be at least 1 (got {settings.clients}).", field="clients"
            )
        return settings

    def configs(self, llm_source: str = "") -> tuple[TrainConfig, FederatedConfig]:
        """train-plug's settings from `options` (`llm_source`: a device's own copy of the
        LLM's source, in place of --llm-source), the federation's clients those it waits
        for."""
        return _configs(self.options, self.clients, llm_source)

    def command(self, app: str = APP_DIR) -> str:
        """The `flwr run` command that trains this federation's head again (SUPERLINK: the
        name of your SuperLink connection): every option spelled out, so a later change of
        a default does not change what it reproduces; the server's folders absolute."""
        config, fed = self.configs()
        words = option_words(config) + option_words(replace(fed, federated_sim=None))
        given = {
            "options": shlex.join(words),
            **{
                k: str(Path(getattr(self, k)).resolve())
                for k in ("task_dir", "home", "bundle", "out")
                if getattr(self, k)
            },
        }
        pairs = [
            f"{f.name.replace('_', '-')}={_toml(given.get(f.name, getattr(self, f.name)))}"
            for f in fields(self)
            if f.name in given or f.name == "clients" or getattr(self, f.name) != f.default
        ]
        return shlex.join(["flwr", "run", app, "SUPERLINK", "--run-config", " ".join(pairs)])


@functools.lru_cache(maxsize=8)
def _configs(options: str, clients: int, llm_source: str) -> tuple[TrainConfig, FederatedConfig]:
    try:
        words = shlex.split(options)
    except ValueError as exc:
        raise InvalidInputError(
            f"The run config's options do not split into words ({exc}): close their quotes.",
            field="options",
        ) from None
    if llm_source:  # the last of an option's values counts, and only it is checked
        words += ["--llm-source", llm_source]
    config, fed = configs_from_words(words, TrainConfig, FederatedConfig)
    if fed.federated_sim:
        raise InvalidInputError(
            "--federated-sim is for one machine: a deployed federation's clients are its "
            "SuperNodes; set their number with the run config's clients.",
            field="federated_sim",
        )
    return config, replace(fed, federated_sim=clients)


def _check_keys(where: str, given: Mapping[str, Any], types: Mapping[str, type]) -> None:
    """Refuse a key of `given` not in `types`, or a value not of its type."""
    unknown = sorted(set(given) - set(types))
    if unknown:
        raise InvalidInputError(
            f"The {where} has keys this app does not know: {', '.join(unknown)} (it knows "
            f"{', '.join(types)}).",
            field=where.replace(" ", "_"),
        )
    for key, value in given.items():
        wanted = types[key]
        if not isinstance(value, wanted) or (wanted is not bool and isinstance(value, bool)):
            raise InvalidInputError(
                f"The {where}'s {key} must be a TOML {_TOML_TYPES[wanted]} (got {value!r}).",
                field=key.replace("-", "_"),
            )


_TOML_TYPES = {str: "string in double quotes", int: "integer", bool: "boolean (true, false)"}


def _toml(value: Any) -> str:
    """A run-config value as `flwr run --run-config` reads it (a string in double quotes,
    which Flower reads up to the next double quote)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if '"' in value:
            raise InvalidInputError(
                f"A run-config string cannot hold a double quote (Flower reads it up to the "
                f"next one): {value!r}; use single quotes inside options.",
                field="run_config",
            )
        return f'"{value}"'
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

NODE_KEYS = {"task-dir": str, "home": str, "bundle": str, "out": str, "llm-source": str,
             "partition-id": int}  # fmt: skip


def device_job(context: Context) -> tuple[ClientJob, int]:
    """This SuperNode's client: the run's settings, the device's own examples, and its
    number (its node config's partition-id, else 0). Its checkpoints go to `<out>/<run
    config's digest>/`: another federation on the same device keeps its own."""
    node = context.node_config
    _check_keys("node config", node, NODE_KEYS)
    settings = RunSettings.of(context.run_config)
    config, fed = settings.configs(str(node.get("llm-source", "")))
    task_dir = _folder(node.get("task-dir"), "The node config's task-dir")
    home_dir = _home(str(node.get("home", "")))
    bundle = _bundle(str(node.get("bundle", "")), home_dir)
    spec, examples, _ = task_examples(task_dir, replace(config, validate=None))
    number = int(node.get("partition-id", 0))
    digest = hashlib.sha256(json.dumps(dict(context.run_config), sort_keys=True).encode())
    out = Path(str(node.get("out") or home_dir / "plug-federated")) / digest.hexdigest()[:16]
    shares = {number: tuple(examples)}
    return ClientJob(str(bundle), str(home_dir), str(out), spec.name, config, fed, shares), number


def device_round(message: Message, context: Context) -> Message:
    """One round on this device. What goes wrong here is said to the server by its kind and
    setting only (its text could name the device's folders or quote its data); the
    device's own log has the rest."""
    try:
        job, number = device_job(context)
    except Exception as exc:
        log.exception("this device cannot train in this federation")
        field = getattr(exc, "field", None)
        raise ClientFailed(
            f"a device could not set up: {type(exc).__name__}"
            + (f" in its {field}" if field else "")
            + " (its own log says why)"
        ) from None
    return client_round(job, number, message, context)


def clip_when_private(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side clipping when the run trains with differential privacy."""
    try:
        _, fed = RunSettings.of(context.run_config).configs()
    except InvalidInputError:
        return call_next(message, context)  # the round says what is wrong, redacted
    if fed.dp_noise:
        return fixedclipping_mod(message, context, call_next)
    return call_next(message, context)


client = ClientApp(mods=[secure_when_asked, clip_when_private])


@client.train()
def _train(message: Message, context: Context) -> Message:
    return device_round(message, context)


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
    _say(
        f"server: the first head from {len(examples)} examples of its own; waiting for "
        f"{fed.federated_sim} clients"
    )
    start = start_server(bundle, examples, spec, out, config, fed, home_dir, held_out, _say)
    run_server(start.job, grid, context)
    head, result, federation = conclude(start, "deployment", held_out, _say)
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
        say=_say,
    )
    return out


def _say(line: str) -> None:
    print(line, flush=True)  # the ServerApp's output is what `flwr run --stream` shows


server = ServerApp()


@server.main()
def _main(grid: Grid, context: Context) -> None:
    run_federation(grid, context)


__all__ = ["APP_DIR", "RunSettings", "client", "device_job", "run_federation", "server"]
