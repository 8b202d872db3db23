"""Federated training on Flower's simulation engine, on the tiny model tests/test_pplug.py
builds: one client holding everything trains central training's head; three clients send
nothing but the head's weights; a client that drops or sends a malformed update does not
stop a round; differential privacy clips each update and reports its ε."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs the [export] extra")
pytest.importorskip("flwr", reason="federated training needs the [federated] extra")

from edge_pllm.errors import InvalidInputError  # noqa: E402
from edge_pllm.tasks.lamp import task_spec  # noqa: E402
from export import pplug  # noqa: E402
from export.pplug import federated  # noqa: E402

from .test_distributed import WEIGHTS_ATOL  # noqa: E402
from .test_pplug import tiny_bundle  # noqa: E402, F401 (a fixture)

REPO = Path(__file__).resolve().parent.parent
SPEC = task_spec("commit_subject")
PEOPLE = {
    "git-1": ("parser", ["Tokenize the input.", "Parse nested lists.", "Report the line."]),
    "git-2": ("docs", ["Explain the flags.", "Fix a typo in the guide.", "Add an example."]),
    "vim-1": ("tests", ["Cover the empty file.", "Run the suite twice.", "Check exit codes."]),
    "vim-2": ("build", ["Link statically.", "Cache the objects.", "Strip the binary."]),
}


def write_people(
    folder: Path, splits: tuple[str, ...] = ("train", "dev"), people: tuple[str, ...] = ()
) -> Path:
    """A commit_subject task of four people in two repositories (ids '<repo>-<n>'), or of
    those of `people`."""
    folder.mkdir(parents=True, exist_ok=True)
    questions, golds = [], []
    for user, (word, texts) in PEOPLE.items():
        if people and user not in people:
            continue
        profile = [
            {"title": f"{word} {i}", "text": t, "date": f"2024-01-0{i + 1}"}
            for i, t in enumerate(texts)
        ]
        questions.append({"id": user, "input": "Subject for: Say my word.", "profile": profile})
        golds.append({"id": user, "output": word})
    for split in splits:
        (folder / f"{split}_questions.json").write_text(json.dumps(questions))
        (folder / f"{split}_outputs.json").write_text(
            json.dumps({"task": "commit_subject", "golds": golds})
        )
    return folder


def examples_of(task: Path) -> list[pplug.Example]:
    return pplug.lamp_examples(task, "train", SPEC, from_profiles=2)


def config(tiny: Path, **changes) -> pplug.TrainConfig:
    return pplug.TrainConfig(
        **{"steps": 4, "batch_size": 2, "dropout_copies": 1, "llm_source": str(tiny),
           "persona_tokens": 2, **changes}
    )  # fmt: skip


class Recorder:
    """A client mod (outermost: it sees each reply as it leaves the client) that writes
    every reply's records to a folder, and can make a client fail or tamper with its
    update in a given round."""

    def __init__(self, folder: Path, fail: tuple[int, int] | None = None,
                 tamper: tuple[int, int] | None = None,
                 tamper_metrics: tuple[int, int] | None = None) -> None:  # fmt: skip
        self.folder, self.fail, self.tamper = folder, fail, tamper
        self.tamper_metrics = tamper_metrics

    def __call__(self, message, context, call_next):
        client = int(context.node_config["partition-id"])
        number = int(message.content["config"]["server-round"])
        sent = {k: np.array(a.numpy()) for k, a in message.content["arrays"].items()}
        if (client, number) == self.fail:
            raise RuntimeError(f"client {client} lost its connection")
        reply = call_next(message, context)
        if (client, number) == self.tamper:
            arrays = reply.content["arrays"]
            name = next(iter(arrays.keys()))
            arrays[name] = federated.Array(np.zeros((3, 3), np.float32))
        if (client, number) == self.tamper_metrics:  # a client weighing itself a million
            reply.content["metrics"] = federated.MetricRecord({"num-examples": 10**6})
        records = {}
        for key, record in reply.content.items():
            if isinstance(record, federated.ArrayRecord):
                records[key] = {k: np.array(a.numpy()) for k, a in record.items()}
            else:
                records[key] = dict(record)
        self.folder.mkdir(parents=True, exist_ok=True)
        dump = {"records": records, "sent": sent, "raw": pickle.dumps(reply.content)}
        (self.folder / f"{client}-{number}.pkl").write_bytes(pickle.dumps(dump))
        return reply


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return write_people(tmp_path_factory.mktemp("people") / "task")


def test_clients_hold_people_or_repositories_whole():
    examples = [pplug.Example.of_texts(u, "q", ["t"], "a") for u in PEOPLE for _ in range(3)]
    by_person = federated.partition(examples, 3, "person")
    assert [len(s) for s in by_person] == [6, 3, 3]  # four people dealt to three clients
    for share in by_person:
        for e in share:
            assert all(o.user != e.user for other in by_person if other is not share for o in other)
    by_repo = federated.partition(examples, 2, "repository")
    assert [{e.user.split("-")[0] for e in s} for s in by_repo] == [{"git"}, {"vim"}]
    with pytest.raises(InvalidInputError, match="at least 3 repositories"):
        federated.partition(examples, 3, "repository")
    fed = pplug.FederatedConfig(federated_sim=3, local_steps=3)
    with pytest.raises(InvalidInputError, match="multiple of --local-steps"):
        fed.rounds(4)
    with pytest.raises(InvalidInputError, match="fedavg or fedprox"):
        pplug.FederatedConfig(federated_sim=3, strategy="fedadam", dp_noise=1.0)
    with pytest.raises(InvalidInputError, match="at most the 3 clients"):
        pplug.FederatedConfig(federated_sim=3, min_clients=4)
    central = pplug.TrainConfig()
    with pytest.raises(InvalidInputError, match="--strategy, --dp-noise without --federated-sim"):
        pplug.FederatedConfig(dp_noise=1.0, strategy="fedprox").check_with(central)
    with pytest.raises(InvalidInputError, match="needs --no-center"):
        pplug.FederatedConfig(federated_sim=3, dp_noise=1.0).check_with(central)
    pplug.FederatedConfig(federated_sim=3, dp_noise=1.0).check_with(pplug.TrainConfig(center=False))
    with pytest.raises(InvalidInputError, match="--init-from"):
        pplug.FederatedConfig(federated_sim=3).check_with(pplug.TrainConfig(init_from="."))


def test_one_client_holding_everything_trains_the_central_head(tiny_bundle, task, tmp_path):  # noqa: F811
    """The server's mean of one head is that head: 2 rounds of 2 steps on one client are
    central training's 4 steps."""
    tiny, bundle = tiny_bundle
    examples = examples_of(task)
    cfg = config(tiny)
    central, _ = pplug.train(bundle, examples, SPEC, tmp_path / "central", cfg, tmp_path, False)
    fed = pplug.FederatedConfig(federated_sim=1, local_steps=2)
    head, result, federation = federated.simulate(
        bundle, examples, SPEC, tmp_path / "fed", cfg, fed, tmp_path
    )
    assert (federation.rounds, federation.clients, result.steps) == (2, 1, 4)
    a, b = central.state_dict(), head.state_dict()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"one client vs central training: max abs weight difference {diff:.2e}")
    assert diff < WEIGHTS_ATOL
    assert float((a["history_mean"] - b["history_mean"]).abs().max()) == 0.0
    client = torch.load(
        tmp_path / "fed" / "clients" / "0" / "round-2" / "checkpoint.pt", weights_only=False
    )
    reference = torch.load(tmp_path / "central" / "checkpoint.pt", weights_only=False)
    assert client["losses"] == pytest.approx(reference["losses"], rel=1e-4)


def test_three_clients_send_only_the_head_and_survive_faults(tiny_bundle, task, tmp_path):  # noqa: F811
    """The CI-sized federation (3 clients, 2 rounds): every reply a client sends holds the
    head's trainable weights, its example count, steps and loss, and the head's version:
    nothing else. Client 2 drops in round 1, client 1's round-2 update has a weight of
    another shape, client 0's round-2 metrics claim a million examples: both rounds go on
    with the others, and the server logs why."""
    tiny, bundle = tiny_bundle
    examples = examples_of(task)
    cfg = config(tiny)
    fed = pplug.FederatedConfig(federated_sim=3, local_steps=2)
    recorder = Recorder(tmp_path / "sent", fail=(2, 1), tamper=(1, 2), tamper_metrics=(0, 2))
    lines: list[str] = []
    head, result, federation = federated.simulate(
        bundle, examples, SPEC, tmp_path / "fed", cfg, fed, tmp_path,
        log_line=lines.append, mods=[recorder],
    )  # fmt: skip
    assert federation.rounds == 2 and len(result.losses) == 2
    assert (
        len(federation.tally.dropped) == 1 and "lost its connection" in federation.tally.dropped[0]
    )
    refused = sorted(federation.tally.refused)
    assert len(refused) == 2 and "[3, 3]" in " ".join(refused) and "metrics" in " ".join(refused)
    assert federation.tally.kept_rounds == []
    assert any(line.startswith("round 2/2, clients' loss") for line in lines)

    names = federated.shared_names(head)
    shapes = {n: tuple(p.shape) for n, p in head.named_parameters()}
    histories = [t.encode() for _, texts in PEOPLE.values() for t in texts]
    replies = sorted((tmp_path / "sent").glob("*.pkl"))
    assert [p.stem for p in replies] == ["0-1", "0-2", "1-1", "1-2", "2-2"]
    for path in replies:
        dump = pickle.loads(path.read_bytes())
        records = dump["records"]
        assert set(records) == {"arrays", "metrics", "head"}
        assert list(records["arrays"]) == names
        if path.stem in ("1-2", "0-2"):  # the tampered ones
            continue
        for name, value in records["arrays"].items():
            assert value.shape == shapes[name] and value.dtype == np.float32
        assert set(records["metrics"]) == {"num-examples", "passes", "train-loss"}
        assert records["metrics"]["passes"] == fed.local_steps * cfg.batch_size
        assert set(records["head"]) == {"version"}
        assert not any(text in dump["raw"] for text in histories)
        # the weights moved from what the server sent: it is a trained head, not an echo
        moved = max(float(np.abs(records["arrays"][n] - dump["sent"][n]).max()) for n in names)
        assert moved > 0
    state = federated.read_state(tmp_path / "fed")
    assert state["round"] == 2


def test_differential_privacy_clips_each_update_and_reports_epsilon(tiny_bundle, task, tmp_path):  # noqa: F811
    """FedProx (its μ sent by Flower's FedProx, the client's loss pulled toward the
    server's head) under differential privacy: each update leaves the client clipped, both
    rounds are released, and the ε spent is reported."""
    tiny, bundle = tiny_bundle
    cfg = config(tiny, steps=2, center=False)
    fed = pplug.FederatedConfig(
        federated_sim=2, local_steps=1, strategy="fedprox", dp_noise=1.0, dp_clip=0.1
    )
    recorder = Recorder(tmp_path / "sent")
    _, _, federation = federated.simulate(
        bundle, examples_of(task), SPEC, tmp_path / "fed", cfg, fed, tmp_path, mods=[recorder]
    )
    assert federation.epsilon is not None and 0 < federation.epsilon < float("inf")
    state = federated.read_state(tmp_path / "fed")
    assert len(state["tally"].losses) == 2 and state["tally"].kept_rounds == []
    assert sum(c["count"] for c in state["privacy"]["compositions"]) == 2  # both released
    entry = federation.as_dict(fed)
    assert entry["dp"]["epsilon"] == federation.epsilon and entry["dp"]["delta"] == 1e-5
    for path in sorted((tmp_path / "sent").glob("*.pkl")):
        dump = pickle.loads(path.read_bytes())
        update = np.concatenate(
            [(v - dump["sent"][k]).ravel() for k, v in dump["records"]["arrays"].items()]
        )
        # float32: (old + clipped update) - old is off by up to an ulp an element, the norm
        # Flower clips by is summed in float32
        ulps = np.concatenate([np.spacing(np.abs(v)).ravel() for v in dump["sent"].values()])
        assert np.linalg.norm(update) <= 0.1 * (1 + 1e-4) + np.linalg.norm(ulps)
        assert np.linalg.norm(update) >= 0.1 * 0.99  # one step moves the head further: clipped


@pytest.mark.slow
def test_train_plug_federated_sim_records_and_resumes(tiny_bundle, task, tmp_path):  # noqa: F811
    """`train-plug --federated-sim 2`: the head's entry says how it was trained and its
    command trains it again; run again, the finished federation is not trained twice."""
    tiny, bundle = tiny_bundle
    args = ["--bundle", str(bundle), "--home", str(tmp_path), "train-plug", str(task)]
    args += ["--steps", "2", "--batch-size", "2", "--llm-source", str(tiny), "--persona-tokens"]
    args += ["2", "--validate", "dev", "--no-attach", "-o", str(tmp_path / "out")]
    args += ["--federated-sim", "2", "--local-steps", "1", "--split-by", "repository"]
    command = [sys.executable, "-m", "export.pplug", *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    entry = json.loads((tmp_path / "out" / "plug.json").read_text())
    assert entry["federation"]["clients"] == 2 and entry["federation"]["rounds"] == 2
    assert "--federated-sim 2 --split-by repository --local-steps 1" in entry["command"]
    assert entry["validation"]["split"] == "dev"
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "round 1/2" not in again.stderr


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_federation_cut_in_a_round_goes_on_from_there(tiny_bundle, task, tmp_path):  # noqa: F811
    """FedAdam, 2 rounds. The server stops right after round 1 (its state written), after
    its clients had already trained round 2 (their round-2 checkpoints are there: a cut
    in the middle of a round): the run says so; the same call again trains round 2 from
    the clients' round-1 checkpoints, to the head of a run never cut, FedAdam's moments
    and round count kept."""
    tiny, bundle = tiny_bundle
    examples, cfg = examples_of(task), config(tiny)
    fed = pplug.FederatedConfig(federated_sim=2, local_steps=2, strategy="fedadam")
    whole, _, _ = federated.simulate(bundle, examples, SPEC, tmp_path / "whole", cfg, fed, tmp_path)

    def cut(line: str) -> None:
        if line.startswith("round 1/2"):
            raise SystemExit("the server's machine went down")

    with pytest.raises(InvalidInputError, match="stopped after round 1 of 2"):
        federated.simulate(
            bundle, examples, SPEC, tmp_path / "cut", cfg, fed, tmp_path, log_line=cut
        )
    for client in ("0", "1"):  # round 2 trained before the cut
        done = tmp_path / "whole" / "clients" / client / "round-2"
        shutil.copytree(done, tmp_path / "cut" / "clients" / client / "round-2")
    lines: list[str] = []
    head, _, _ = federated.simulate(
        bundle, examples, SPEC, tmp_path / "cut", cfg, fed, tmp_path, log_line=lines.append
    )
    assert not any(line.startswith("round 1/2") for line in lines)
    assert any(line.startswith("round 2/2") for line in lines)
    a, b = whole.state_dict(), head.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < WEIGHTS_ATOL
    with pytest.raises(InvalidInputError, match="strategy 'fedadam' \\(now 'fedavg'\\)"):
        other = pplug.FederatedConfig(federated_sim=2, local_steps=2)
        federated.simulate(bundle, examples, SPEC, tmp_path / "cut", cfg, other, tmp_path)


def test_the_flower_app_reads_its_run_config_as_train_plug_reads_its_options(tmp_path):
    """The deployed app's run config: its defaults are the app's pyproject's, its options
    are train-plug's (checked as the command checks them), every value of its type, and the
    command it records, read by Flower's own parser, runs the same federation again."""
    import shlex
    import tomllib

    from flwr.common.config import parse_config_args

    from export.pplug.deployment import APP_DIR, RunSettings

    app = tomllib.loads((REPO / APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert RunSettings.of(app["config"]) == RunSettings()
    assert app["components"] == {
        "serverapp": "export.pplug.deployment:server",
        "clientapp": "export.pplug.deployment:client",
    }
    given = RunSettings(
        options="--steps 4 --local-steps 2 --strategy fedprox --llm-source '.'",
        clients=3,
        task_dir=str(tmp_path),
        attach=False,
    )
    config, fed = given.configs()
    assert (config.steps, fed.local_steps, fed.strategy, fed.federated_sim) == (4, 2, "fedprox", 3)
    words = shlex.split(given.command())
    assert words[:4] == ["flwr", "run", APP_DIR, "SUPERLINK"] and words[4] == "--run-config"
    again = RunSettings.of(parse_config_args([words[5]]))
    assert again.configs() == (config, fed)
    assert (again.task_dir, again.attach, again.clients) == (str(tmp_path), False, 3)
    assert given.configs(llm_source=str(tmp_path))[0].llm_source == str(tmp_path)
    with pytest.raises(InvalidInputError, match="--federated-sim is for one machine"):
        RunSettings(options="--federated-sim 2").configs()
    with pytest.raises(InvalidInputError, match="not train-plug's: No such option '--stepz'"):
        RunSettings(options="--stepz 2").configs()
    with pytest.raises(InvalidInputError, match="not train-plug's: No such option '--help'"):
        RunSettings(options="--help").configs()
    with pytest.raises(InvalidInputError, match="do not split into words"):
        RunSettings(options="--task 'open").configs()
    with pytest.raises(InvalidInputError, match="keys this app does not know: task"):
        RunSettings.of({"task": "x"})
    with pytest.raises(InvalidInputError, match="attach must be a TOML boolean"):
        RunSettings.of({"attach": "false"})
    with pytest.raises(InvalidInputError, match="clients must be a TOML integer"):
        RunSettings.of({"clients": True})
    with pytest.raises(InvalidInputError, match="at most the 2 clients"):
        RunSettings(options="--min-clients 3", clients=2).configs()


def test_a_device_tells_the_server_what_failed_never_its_folders(tmp_path):
    """A SuperNode whose node config names a folder that is not there (or a value of the
    wrong type) fails its round saying the kind and the setting: the folder's name, which
    could name the device's owner, stays in the device's own log."""
    from flwr.app import Context, RecordDict

    from export.pplug import deployment

    private = str(tmp_path / "alice-private-notes")
    run = {"options": "--steps 2 --local-steps 1", "clients": 2}
    message = object()  # never read: the device fails before its round
    for node, field in (
        ({"task-dir": private}, "task_dir"),
        ({"partition-id": "x"}, "partition_id"),
    ):
        context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=run)
        with pytest.raises(federated.ClientFailed) as failed:
            deployment.device_round(message, context)
        assert f"InvalidInputError in its {field}" in str(failed.value)
        assert "alice" not in str(failed.value)


def _free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _wait_for(port: int, seconds: float = 60) -> None:
    import socket
    import time

    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.slow
def test_the_flower_app_trains_across_a_superlink_and_three_supernodes(tiny_bundle, tmp_path):  # noqa: F811
    """Flower's own deployment, on one machine: `flower-superlink`, three
    `flower-supernode`s each holding its own people in its own folder, and `flwr run
    federation/` with secure aggregation (SecAgg+'s four stages a round, each device's
    protocol state kept by its SuperNode between them). The server starts from its own
    data, runs both rounds, validates and writes the head as train-plug does; each device
    kept its checkpoints in its own folder."""
    tiny, bundle = tiny_bundle
    link, *node_ports = _free_ports(4)
    flwr_home = tmp_path / "flwr"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "here"\n\n[superlink.here]\naddress = "127.0.0.1:{link}"\n'
        "insecure = true\n"
    )
    bin_dir = Path(sys.executable).parent
    # Flower's processes start more of its commands by name: the environment's bin first
    path = os.pathsep.join((str(bin_dir), os.environ.get("PATH", "")))
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "PYTHONPATH": str(REPO), "PATH": path}
    with contextlib.ExitStack() as stack:

        def start(name: str, *args: str) -> None:
            log = stack.enter_context(open(tmp_path / f"{name}.log", "w"))
            process = subprocess.Popen(
                [bin_dir / args[0], *args[1:]], env=env, stdout=log, stderr=subprocess.STDOUT
            )
            stack.callback(process.wait, timeout=60)
            stack.callback(process.terminate)

        start(
            "superlink", "flower-superlink", "--insecure",
            "--disable-runtime-dependency-installation", "--port", str(link),
        )  # fmt: skip
        _wait_for(link)
        for n, people in enumerate((("git-1",), ("git-2",), ("vim-1", "vim-2"))):
            device = tmp_path / f"device-{n}"
            write_people(device / "task", ("train",), people)
            node = {"task-dir": device / "task", "home": device / "home", "bundle": bundle,
                    "out": device / "out"}  # fmt: skip
            start(
                f"supernode-{n}", "flower-supernode", "--insecure", "--superlink",
                f"127.0.0.1:{link}", "--port", str(node_ports[n]), "--node-config",
                " ".join(f'{k}="{v}"' for k, v in node.items()) + f" partition-id={n}",
            )  # fmt: skip
        options = "--steps 2 --local-steps 1 --batch-size 2 --dropout-copies 1 --persona-tokens 2"
        options += f" --llm-source {tiny} --validate dev --secure-aggregation"
        run = {
            "options": options,
            "task-dir": write_people(tmp_path / "server-task"),
            "bundle": bundle,
            "home": tmp_path / "server-home",
            "out": tmp_path / "out",
        }
        run_config = " ".join(f'{k}="{v}"' for k, v in run.items()) + " clients=3 attach=false"
        done = subprocess.run(
            [bin_dir / "flwr", "run", REPO / "federation", "here", "--run-config", run_config,
             "--stream"],
            env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path,
        )  # fmt: skip
        logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(tmp_path.glob("*.log")))
        said = done.stdout + done.stderr + logs
        assert done.returncode == 0, said
        entry = json.loads((tmp_path / "out" / "plug.json").read_text())
        assert entry["federation"]["runtime"] == "deployment", said
        assert entry["federation"]["clients"] == 3 and entry["federation"]["rounds"] == 2
        assert entry["federation"]["secure_aggregation"] == "SecAgg+"
        assert entry["federation"]["rounds_kept"] == [] and entry["federation"]["dropped"] == 0
        held = sum(len(examples_of(tmp_path / f"device-{n}" / "task")) for n in range(3))
        assert entry["examples"] == held
        assert entry["validation"]["split"] == "dev"
        assert entry["command"].startswith("flwr run federation SUPERLINK --run-config")
        for n in (0, 1, 2):  # under a folder of this run config's own
            kept = list((tmp_path / f"device-{n}" / "out").glob(f"*/clients/{n}/round-2"))
            assert len(kept) == 1, sorted((tmp_path / f"device-{n}").rglob("*"))


def test_secure_aggregation_sends_only_masked_heads_and_trains_the_plain_mean(
    tiny_bundle,  # noqa: F811
    tmp_path,
):
    """SecAgg+ (3 clients holding one person each, so the plain mean weighs them as
    FedAvg does): no reply carries a head the server could read (no array leaves a client,
    and the bytes of the head it trained, as its checkpoint keeps it, are not in what it
    sends); the head the server assembles is FedAvg's without secure aggregation, within
    SecAgg+'s quantization."""
    task = write_people(tmp_path / "task", ("train",), ("git-1", "git-2", "vim-1"))
    tiny, bundle = tiny_bundle
    examples, cfg = examples_of(task), config(tiny)
    plain_fed = pplug.FederatedConfig(federated_sim=3, local_steps=2)
    plain, _, _ = federated.simulate(
        bundle, examples, SPEC, tmp_path / "plain", cfg, plain_fed, tmp_path
    )
    sent_dir = tmp_path / "sent"
    sent_dir.mkdir()

    def spy(message, context, call_next):  # outermost: what leaves the client (in a worker)
        reply = call_next(message, context)
        client = int(context.node_config["partition-id"])
        (sent_dir / f"{client}-{uuid.uuid4().hex}.pkl").write_bytes(pickle.dumps(reply.content))
        return reply

    secure_fed = pplug.FederatedConfig(federated_sim=3, local_steps=2, secure_aggregation=True)
    secure, _, federation = federated.simulate(
        bundle, examples, SPEC, tmp_path / "secure", cfg, secure_fed, tmp_path, mods=[spy]
    )
    assert federation.as_dict(secure_fed)["secure_aggregation"] == "SecAgg+"
    assert federation.tally.kept_rounds == [] and len(federation.tally.losses) == 2
    assert federation.tally.refused == [] and federation.tally.dropped == []
    replies: dict[int, list[bytes]] = {}
    for path in sent_dir.glob("*.pkl"):
        replies.setdefault(int(path.stem.split("-")[0]), []).append(path.read_bytes())
    assert sorted(replies) == [0, 1, 2] and all(len(r) == 2 * 4 for r in replies.values())
    for raw in (r for sent in replies.values() for r in sent):
        content = pickle.loads(raw)
        assert all(len(record) == 0 for record in content.array_records.values())
        said = content.config_records.get("fitres.metrics", {})
        assert set(said) <= {"version", "passes"}  # no loss, no example count in the clear
    names = federated.shared_names(secure)
    for client, sent in replies.items():
        for number in (1, 2):
            saved = torch.load(
                tmp_path / "secure" / "clients" / str(client) / f"round-{number}" / "checkpoint.pt",
                weights_only=False,
            )["head"]
            for name in names:
                chunk = saved[name].float().numpy().tobytes()[:64]
                assert not any(chunk in raw for raw in sent), (client, number, name)
    a, b = plain.state_dict(), secure.state_dict()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"SecAgg+ vs FedAvg: max abs weight difference {diff:.2e}")
    assert diff < 1e-4
    assert federation.tally.examples == {1: len(examples), 2: len(examples)}

    def two_fail_in_round_1(message, context, call_next):
        records = message.content.config_records
        stage = records.get("secaggplus_configs", {}).get("stage")
        number = records.get("fitins.config", {}).get("server-round")
        client = int(context.node_config["partition-id"])
        if stage == "collect_masked_vectors" and number == 1 and client in (1, 2):
            raise RuntimeError("lost its connection")
        return call_next(message, context)

    # Two of three clients lost in round 1: SecAgg+ stops the round (too few to unmask),
    # which keeps the head and counts as such; round 2 goes on.
    _, _, cut = federated.simulate(
        bundle, examples, SPEC, tmp_path / "cut", cfg, secure_fed, tmp_path,
        mods=[two_fail_in_round_1],
    )  # fmt: skip
    assert cut.tally.kept_rounds == [1] and list(cut.tally.losses) == [2]
    assert any("SecAgg+ stopped the round" in d for d in cut.tally.dropped)
