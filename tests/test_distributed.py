"""train-plug on several processes (torchrun, gloo on the CPU): each takes its share of a
step's examples, and the head is the one a single process trains with the same
--batch-size and seed, within float tolerance; a checkpoint resumes with any number of
processes. The tiny model is the one tests/test_pplug.py builds."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="training needs the [export] extra")

from edge_pllm.errors import InvalidInputError  # noqa: E402
from edge_pllm.tasks.lamp import task_spec  # noqa: E402
from export import pplug  # noqa: E402

from .test_pplug import tiny_bundle, write_task  # noqa: E402, F401 (a fixture)

REPO = Path(__file__).resolve().parent.parent


# --- without processes: the arithmetic ------------------------------------------------------


def test_each_process_takes_its_share_of_the_batch_one_process_draws():
    """Every process draws the whole step's batch from the same stream, as one process
    does; the shares, in rank order, are that batch, differ by at most one example, and
    leave every process's random stream where one process's is."""
    examples = [
        pplug.Example.of_texts(f"u{i}", f"q{i}", [f"item {i}.{j}" for j in range(6)], "a")
        for i in range(11)
    ]
    config = pplug.TrainConfig(batch_size=7, dropout_copies=3, rag=1, steps=1)
    random.seed(3)
    first_indices = [random.randrange(len(examples)) for _ in range(7)]
    random.seed(3)
    whole = [pplug.draw_batch(examples, config, rag=True) for _ in range(3)]
    after = random.random()
    assert [d.index for d in whole[0]] == first_indices
    assert any(d.rag for b in whole for d in b) and not all(d.rag for b in whole for d in b)
    assert any(len(d.history) < 6 for b in whole for d in b)  # history dropout drew too
    for size in (1, 2, 3, 4, 7):
        shares = []
        for rank in range(size):
            world = pplug.World(rank=rank, size=size)
            random.seed(3)
            steps = [pplug.draw_batch(examples, config, rag=True) for _ in range(3)]
            assert random.random() == after
            shares.append([batch[world.shard(config.batch_size)] for batch in steps])
        for step in range(3):
            assert [d for share in shares for d in share[step]] == whole[step]
        sizes = [len(share[0]) for share in shares]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert pplug.World(rank=1, size=2).shard(8) == slice(4, 8)
    assert pplug.World(rank=2, size=4).shard(10) == slice(6, 8)  # 3, 3, 2, 2


def test_shares_divided_by_the_whole_batch_tokens_sum_to_the_batch_gradient():
    """The loss is a mean over the batch's target tokens, and answers differ in length: the
    mean of per-process means is not the batch's mean, but each share's loss sum divided by
    the whole batch's token count, gradients summed, is the batch's gradient exactly."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 1).double()
    inputs = torch.randn(6, 4, 5, dtype=torch.float64)  # 6 examples, up to 4 target tokens
    lengths = torch.tensor([4, 3, 2, 1, 1, 1])  # the first share has 9 tokens, the second 3
    mask = torch.arange(4)[None] < lengths[:, None]

    def loss_sum(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        losses = layer(inputs[rows]).squeeze(-1) ** 2
        return (losses * mask[rows]).sum(), mask[rows].sum()

    def gradient(loss: torch.Tensor) -> torch.Tensor:
        layer.zero_grad()
        loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in layer.parameters()])

    total, tokens = loss_sum(slice(0, 6))
    expected = gradient(total / tokens)
    shares = [pplug.World(rank=r, size=2).shard(6) for r in range(2)]
    summed = sum(gradient(loss_sum(s)[0] / tokens) for s in shares)
    torch.testing.assert_close(summed, expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        means = [torch.div(*loss_sum(s)) for s in shares]
        assert float(sum(means) / 2) != pytest.approx(float(total / tokens), rel=1e-3)


def test_the_launch_is_read_from_the_environment():
    assert pplug.World.from_env({}) == pplug.World()
    assert pplug.World.from_env({"WORLD_SIZE": "1", "RANK": "0"}).size == 1
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    world = pplug.World.from_env(env)
    assert world == pplug.World(rank=3, size=4, local_rank=1, local_size=2)
    assert not world.is_main
    with pytest.raises(InvalidInputError, match="RANK"):
        pplug.World.from_env({"WORLD_SIZE": "2"})
    with pytest.raises(InvalidInputError, match="at least one each") as error:
        world.check_batch(3)
    assert error.value.field == "batch_size"
    world.check_batch(4)


# --- two processes under torchrun ------------------------------------------------------------


def train_plug(
    bundle: Path, tiny: Path, task: Path, home: Path, out: Path, processes: int, *extra: str
) -> subprocess.CompletedProcess:
    """`train-plug` in `processes` processes (torchrun, gloo), or in one without a
    launcher: 4 steps of 4 examples (2 per process), validated on dev."""
    args = ["--bundle", str(bundle), "--home", str(home), "train-plug", str(task)]
    args += ["--steps", "4", "--batch-size", "4", "--llm-source", str(tiny)]
    args += ["--persona-tokens", "2", "--validate", "dev", "--no-attach", "-o", str(out), *extra]
    command = [sys.executable, "-m", "export.pplug"]
    if processes > 1:
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
        command = [sys.executable, *launch, str(processes), "-m", "export.pplug"]
    done = subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def head_difference(a: Path, b: Path) -> float:
    """The largest difference between two checkpoints' head weights."""
    first = torch.load(a / "checkpoint.pt", weights_only=False)["head"]
    second = torch.load(b / "checkpoint.pt", weights_only=False)["head"]
    assert first.keys() == second.keys()
    return max(float((first[k] - second[k]).abs().max()) for k in first)


# Heads agree to float noise: gradients to ~1e-6 relative; AdamW's g / (√v + ε) magnifies
# that noise in the ~1 % of weights whose gradient is below 1e-7, up to a few % of one
# step's update (lr 1e-3).
WEIGHTS_ATOL = 2e-4


@pytest.fixture(scope="module")
def runs(tiny_bundle, tmp_path_factory):  # noqa: F811
    """The same training in one process and in two."""
    tiny, bundle = tiny_bundle
    root = tmp_path_factory.mktemp("distributed")
    task = write_task(root / "task", splits=("train", "dev"))
    one = train_plug(bundle, tiny, task, root / "home1", root / "one", 1)
    two = train_plug(bundle, tiny, task, root / "home2", root / "two", 2)
    return root, tiny, bundle, task, one, two


@pytest.mark.slow
def test_two_processes_train_the_head_one_process_trains(runs):
    root, two = runs[0], runs[-1]
    diff = head_difference(root / "one", root / "two")
    print(f"head weights, 1 process vs 2 (torchrun, gloo): max abs diff {diff:.2e}")
    assert diff < WEIGHTS_ATOL
    a = torch.load(root / "one" / "checkpoint.pt", weights_only=False)
    b = torch.load(root / "two" / "checkpoint.pt", weights_only=False)
    assert len(a["losses"]) == len(b["losses"]) == 4
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)
    assert (a["step"], a["batch_size"], a["world_size"]) == (4, 4, 1)
    assert (b["step"], b["batch_size"], b["world_size"]) == (4, 4, 2)
    # The recorded command and config do not depend on the number of processes; the
    # entry says how many shared the steps.
    first = json.loads((root / "one" / "plug.json").read_text())
    second = json.loads((root / "two" / "plug.json").read_text())
    assert second["command"] == first["command"] and second["config"] == first["config"]
    assert (first["world_size"], second["world_size"]) == (1, 2)
    assert second["device"].endswith("× 2 processes")
    # Validation was shared out and gathered: the same numbers.
    for name in ("loss_none", "loss_plug", "loss_plug_other"):
        assert second["validation"][name] == pytest.approx(first["validation"][name], abs=2e-4)
    # Rank 1 is quiet: one process told what it did.
    for line in ("training examples from train", "validation loss on 2 examples", "Trained in"):
        assert two.stderr.count(line) + two.stdout.count(line) == 1, line
    assert (root / "two" / "plug.onnx").is_file()


@pytest.mark.slow
def test_a_checkpoint_resumes_with_another_number_of_processes(runs):
    """Interrupted training (a checkpoint at step 4) continues to step 6 in one process
    from the two processes' checkpoint, and in two from one's, as one process continues
    its own; another batch size is refused."""
    root, tiny, bundle, task, *_ = runs
    for name in ("one", "two"):
        shutil.copytree(root / name, root / f"{name}-in-1")
    shutil.copytree(root / "one", root / "one-in-2")
    for name in ("one-in-1", "two-in-1", "one-in-2"):  # as if cut at step 4 of a 6-step run
        path = root / name / "checkpoint.pt"
        state = torch.load(path, weights_only=False)
        state["config"]["steps"] = 6
        torch.save(state, path)
    more = ("--steps", "6")
    train_plug(bundle, tiny, task, root / "home1", root / "one-in-1", 1, *more)
    train_plug(bundle, tiny, task, root / "home1", root / "two-in-1", 1, *more)
    train_plug(bundle, tiny, task, root / "home2", root / "one-in-2", 2, *more)
    reference = torch.load(root / "one-in-1" / "checkpoint.pt", weights_only=False)
    assert reference["step"] == 6
    for name in ("two-in-1", "one-in-2"):
        diff = head_difference(root / "one-in-1", root / name)
        print(f"resumed {name}: max abs diff {diff:.2e} from one process resuming its own")
        assert diff < WEIGHTS_ATOL
        state = torch.load(root / name / "checkpoint.pt", weights_only=False)
        assert state["step"] == 6 and state["losses"] == pytest.approx(
            reference["losses"], rel=1e-5
        )
    config = pplug.TrainConfig(steps=6, batch_size=2, llm_source=str(tiny), persona_tokens=2)
    spec = task_spec("commit_subject")
    examples = pplug.lamp_examples(task, "train", spec, from_profiles=4)
    with pytest.raises(InvalidInputError, match="--batch-size 4") as error:
        pplug.train(bundle, examples, spec, root / "two", config, root / "home1", False)
    assert error.value.field == "batch_size"


@pytest.mark.slow
def test_two_processes_fine_tune_a_head_with_sampled_answers(runs):
    """--init-from and --outcome-samples under torchrun: every process starts from the
    head, samples its share's answers, and the batch's mean score is gathered."""
    root, tiny, bundle, task, *_ = runs
    extra = ("--outcome-samples", "2", "--init-from", str(root / "one"), "--steps", "2")
    train_plug(bundle, tiny, task, root / "home2", root / "outcome-2", 2, *extra)
    entry = json.loads((root / "outcome-2" / "plug.json").read_text())
    assert 0.0 <= entry["final_rouge1"] <= 1.0
    assert f"--init-from {root / 'one'}" in entry["command"]
    state = torch.load(root / "outcome-2" / "checkpoint.pt", weights_only=False)
    assert len(state["scores"]) == 2 and state["world_size"] == 2
