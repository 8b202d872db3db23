"""The evaluation runner end to end on a tiny LaMP-format fixture, including a real kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_pllm import LLMConfig, PersonalLLM
from edge_pllm.evaluate import RunConfig, report, run
from edge_pllm.tasks.lamp import task_spec

PROFILES = {
    "u1": [
        ("fix: handle empty files", "The reader crashed on empty input."),
        ("docs: describe the cache", "Explain where the cache lives."),
    ],
    "u2": [
        ("BUG: fix overflow in sum", "Integer sums overflowed on 32-bit."),
        ("ENH: add axis keyword", "unique() now takes an axis."),
    ],
    "u3": [("gitk: fix typo", "A label was misspelled.")],
    "u4": [],
}


def make_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    questions, golds = [], []
    for i, (user, profile) in enumerate(PROFILES.items()):
        questions.append(
            {
                "id": user,
                "input": f"Generate a subject line for the following commit message: {i}.\nMore.",
                "profile": [
                    {"id": f"{user}-{j}", "title": t, "text": b, "date": f"2024-01-0{j + 1}"}
                    for j, (t, b) in enumerate(profile)
                ],
            }
        )
        golds.append({"id": user, "output": profile[-1][0] if profile else "Change"})
    (folder / "dev_questions.json").write_text(json.dumps(questions))
    (folder / "dev_outputs.json").write_text(json.dumps({"task": "commit_subject", "golds": golds}))
    return folder


def test_runner_writes_lamp_outputs_metrics_and_keeps_users_apart(default_bundle, tmp_path):
    pytest.importorskip("rouge_score", reason="ROUGE needs the [eval] extra")
    task = make_task(tmp_path / "task")
    out = tmp_path / "run"
    with PersonalLLM(
        default_bundle, home=tmp_path / "home", llm_config=LLMConfig(n_ctx=1024, n_threads=2)
    ) as pllm:
        config = RunConfig(task, ["dev"], ["none", "rag:2", "rag:2@other"], out, max_tokens=12)
        (result,) = run(config, pllm, progress=False)
        # Each query's history is exactly its own profile.
        for user, profile in PROFILES.items():
            name = f"dev:{user}"
            if not profile:
                assert not pllm.store.has_user(name)
                continue
            texts = sorted(i.text for i in pllm.store.items(name))
            assert texts == sorted(f"{t}\n\n{b}" for t, b in profile)
    assert set(result.metrics) == {
        "floor:first-line",
        "floor:latest",
        "none",
        "rag:2",
        "rag:2@other",
    }
    # The personalization gap is own history − another user's, paired on the same queries.
    gap = result.vs_other["rag:2"]["rouge-1"]
    own, other = (result.metrics[s]["rouge-1"].value for s in ("rag:2", "rag:2@other"))
    assert gap.value == pytest.approx(own - other) and gap.low <= gap.value <= gap.high
    assert "own history − another user's" in report([result], task_spec("commit_subject"), {})
    assert result.metrics["floor:latest"]["rouge-1"].value == pytest.approx(0.75)  # u4 misses
    outputs = json.loads((out / "dev_rag-2_outputs.json").read_text())
    assert outputs["task"] == "commit_subject" and len(outputs["golds"]) == 4
    saved = json.loads((out / "dev_metrics.json").read_text())
    assert saved["n"] == 4 and "rag:2" in saved["vs_none"] and "rag:2" in saved["vs_other"]
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 20


def test_killed_run_resumes_where_it_stopped(default_bundle, tmp_path):
    pytest.importorskip("rouge_score", reason="ROUGE needs the [eval] extra")
    task = make_task(tmp_path / "task")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "edge_pllm.cli",
        "--bundle",
        str(default_bundle),
        "--n-ctx",
        "1024",
        "eval",
        str(task),
        "-s",
        "none,recent:2,rag:1",
        "--out",
        str(out),
    ]
    env = {**os.environ, "EDGE_PLLM_HOME": str(tmp_path / "home")}
    preds = out / "predictions.jsonl"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if preds.is_file() and len(preds.read_text().splitlines()) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [json.loads(line) for line in preds.read_text().splitlines() if line.endswith("}")]
    assert 7 <= len(before) < 20, "the kill should land mid-run"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    keys = [(r["strategy"], r["id"]) for r in rows]
    assert len(set(keys)) == 20  # 4 queries x (2 floors + 3 strategies), none lost
    assert len(keys) - len(set(keys)) <= 1  # at most the answer cut by the kill was redone
    first = {(r["strategy"], r["id"]): r["output"] for r in reversed(rows)}
    assert all(first[(r["strategy"], r["id"])] == r["output"] for r in before)
    assert "| `rag:1` |" in done.stdout


def _without_timings(metrics_json: dict) -> dict:
    return {k: v for k, v in metrics_json.items() if k != "seconds"}


def test_sharded_runs_merged_score_as_one_run(default_bundle, tmp_path):
    """Two shards on their own homes (as on two machines), merged, give the same metrics,
    outputs and report as one unsharded run."""
    pytest.importorskip("rouge_score", reason="ROUGE needs the [eval] extra")
    from edge_pllm.errors import InvalidInputError
    from edge_pllm.evaluate import Shard, merge

    task = make_task(tmp_path / "task")
    strategies = ["rag:2", "rag:2@other"]
    llm_config = LLMConfig(n_ctx=1024, n_threads=2)

    def run_in(out: Path, shard: Shard | None = None):
        config = RunConfig(task, ["dev"], strategies, out, max_tokens=8, shard=shard)
        with PersonalLLM(default_bundle, home=out, llm_config=llm_config) as pllm:
            return run(config, pllm, progress=False)

    (whole,) = run_in(tmp_path / "whole")
    assert run_in(tmp_path / "s1", Shard(1, 2)) == []  # a shard answers, and scores nothing
    merged_config = RunConfig(task, ["dev"], strategies, tmp_path / "merged", max_tokens=8)
    with pytest.raises(InvalidInputError, match="lack 8 answers"):
        merge(merged_config, [tmp_path / "s1"])  # shard 2 is not done yet
    run_in(tmp_path / "s2", Shard(2, 2))
    assert merge(merged_config, [tmp_path / "s1", tmp_path / "s2"]) == 16
    with PersonalLLM(default_bundle, home=tmp_path / "merged", llm_config=llm_config) as pllm:
        (together,) = run(merged_config, pllm, progress=False)
        assert pllm.store.users() == []  # scoring the merged answers generated nothing

    def saved(folder: str) -> dict:
        return _without_timings(json.loads((tmp_path / folder / "dev_metrics.json").read_text()))

    assert saved("merged") == saved("whole")
    for name in ("floor-first-line", "rag-2", "rag-2@other"):
        file = f"dev_{name}_outputs.json"
        assert (tmp_path / "merged" / file).read_text() == (tmp_path / "whole" / file).read_text()
    spec = task_spec("commit_subject")

    def table(result) -> list[str]:  # the report's rows without the s/query column
        lines = report([result], spec, {}).splitlines()
        return [line.rsplit("|", 2)[0] for line in lines if line.startswith("| `")]

    assert table(together) == table(whole)
    assert Shard.parse("2/4") == Shard(2, 4)
    for bad in ("0/2", "3/2", "x/2", "2", "²/4"):
        with pytest.raises(InvalidInputError, match="--shard"):
            Shard.parse(bad)


def test_a_missing_scorer_is_said_before_any_answer(default_bundle, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from edge_pllm.cli import cli

    monkeypatch.setitem(sys.modules, "rouge_score", None)  # as on the device install
    task, out = make_task(tmp_path / "task"), tmp_path / "run"
    args = ["--home", str(tmp_path / "home"), "--bundle", str(default_bundle), "eval", str(task)]
    done = CliRunner().invoke(cli, [*args, "-s", "none", "--no-floors", "--out", str(out)])
    assert done.exit_code == 1 and "pip install 'edge-pllm[eval]'" in done.output
    assert not (out / "predictions.jsonl").exists() or not (out / "predictions.jsonl").read_text()
    sharded = CliRunner().invoke(
        cli,
        [*args, "-s", "none", "--no-floors", "--limit", "1", "--shard", "1/2", "--out", str(out)],
    )  # a share is answered without scoring: it needs no scorer
    assert sharded.exit_code == 0, sharded.output
