"""Models by reference (`edge-pllm models add`): the GGUFs a person already has, with the
default bundle's embedder, on the CLI, the library and the server (real llama.cpp)."""

from __future__ import annotations

import os
import sys

import pytest
from click.testing import CliRunner

from edge_pllm import InvalidInputError, SamplingConfig
from edge_pllm.cli import cli
from edge_pllm.errors import BundleError, ModelChangedError, UnknownModelError
from edge_pllm.inference.model_registry import add_model, list_models, models_dir

from .model_support import GEMMA_TEMPLATE, runtime

SHORT = SamplingConfig(max_tokens=4)


def test_a_registered_gguf_answers_in_place_of_the_bundles_and_is_never_copied(
    default_bundle, smol, tmp_path
):
    home = tmp_path / "home"
    before = os.stat(smol)
    record = add_model(home, smol)
    assert record.name == "smollm2-135m-instruct.q4_1" and record.quantization == "Q4_1"
    assert (record.architecture, record.context_length, record.template_source) == (
        "llama", 8192, "gguf")  # fmt: skip
    assert record.linked and os.path.samefile(models_dir(home) / record.name / "model.gguf", smol)
    assert os.stat(smol).st_nlink == before.st_nlink + 1  # a hard link: no second copy
    kept = sum(f.stat().st_size for f in models_dir(home).rglob("*.json"))
    assert kept < 1_000_000  # the data directory grows by a record, not a model
    with runtime(default_bundle, home, record.name) as pllm:
        pllm.add("ann", ["I prefer short, imperative commit subjects."])
        assert pllm.bundle.llm.file == str(models_dir(home) / record.name / "model.gguf")
        # The head was trained for exactly this file (same sha256): `plug` is offered.
        assert pllm.head_usable()
        answer = pllm.generate("ann", "Fix the cache", strategy="plug+rag:1", sampling=SHORT)
        assert answer.text and answer.soft_tokens > 0
    with pytest.raises(InvalidInputError, match="registered already"):
        add_model(home, smol, record.name)
    smol.rename(smol.with_name("moved.gguf"))  # the link keeps the model usable
    with runtime(default_bundle, home, record.name) as pllm:
        assert pllm.generate("ann", "hi", strategy="none", sampling=SHORT).text is not None


def test_a_changed_file_is_one_clear_error(default_bundle, smol, tmp_path):
    home = tmp_path / "home"
    record = add_model(home, smol, "smol")
    with open(smol, "ab") as f:  # the same inode as the link: the change shows through
        f.write(b"\0")
    with pytest.raises(ModelChangedError, match="changed since it was added") as caught:
        runtime(default_bundle, home, "smol")
    assert caught.value.name == "smol" and "models add" in str(caught.value)
    with pytest.raises(UnknownModelError, match="registered: smol"):
        runtime(default_bundle, home, "nope")
    assert [m.name for m in list_models(home)] == [record.name]
    listed = CliRunner().invoke(
        cli, ["--home", str(home), "--bundle", str(default_bundle), "models"]
    )
    row = next(line for line in listed.output.splitlines() if line.startswith("smol\t"))
    assert "(cannot be used: it changed since it was added; `edge-pllm models remove smol`)" in row


def test_a_gguf_without_a_chat_template_needs_one(default_bundle, gemma_file, tmp_path):
    home = tmp_path / "home"
    with pytest.raises(InvalidInputError, match="no chat template") as caught:
        add_model(home, gemma_file, "gemma")
    assert caught.value.field == "chat_template" and not list_models(home)
    record = add_model(home, gemma_file, "gemma", chat_template=GEMMA_TEMPLATE)
    assert (record.architecture, record.template_source) == ("gemma3", "given")
    with runtime(default_bundle, home, "gemma") as pllm:
        pllm.add("ann", ["Parked the car on level 3, row F."])
        assert pllm.llm.chat_template == GEMMA_TEMPLATE
        prepared = pllm.prepare("ann", "Where did I park?", "rag:1", SHORT)
        assert "<start_of_turn>user\n" in prepared.prompt and "level 3" in prepared.prompt
        assert pllm.generate("ann", "Where did I park?", strategy="rag:1", sampling=SHORT)
        assert not pllm.head_usable()  # trained for another model: refused, with the reason
        with pytest.raises(BundleError, match="trained for another model"):
            pllm.generate("ann", "hi", strategy="plug", sampling=SHORT)


def test_the_cli_registers_lists_and_answers_with_a_model(default_bundle, smol, tmp_path):
    runner = CliRunner()
    base = ["--home", str(tmp_path / "home"), "--bundle", str(default_bundle)]
    added = runner.invoke(cli, [*base, "models", "add", str(smol), "--name", "smol"])
    assert added.exit_code == 0, added.output
    assert "Registered smol: llama Q4_1" in added.output and "--model smol" in added.output
    listed = runner.invoke(cli, [*base, "models"])
    rows = {line.split("\t")[0]: line.split("\t") for line in listed.output.splitlines()}
    assert rows["smol"][1:6] == ["94 MB", "Q4_1", "8192", "gguf", "yes"]
    assert "default (bundle)" in rows
    runner.invoke(cli, [*base, "add", "ann", "Short imperative subjects."])
    asked = runner.invoke(cli, [*base, "--model", "smol", "ask", "ann", "hi", "-n", "2"])
    assert asked.exit_code == 0, asked.output
    env = runner.invoke(cli, [*base, "ask", "ann", "hi", "-n", "2"], env={"EDGE_PLLM_MODEL": "x"})
    assert env.exit_code == 1 and "No model named 'x' is registered" in env.output
    after = runner.invoke(cli, [*base, "ask", "-m", "y", "ann", "hi"])  # on the command too
    assert after.exit_code == 1 and "No model named 'y' is registered" in after.output
    assert (
        runner.invoke(cli, [*base, "ask", "--model", "smol", "ann", "hi", "-n", "1"]).exit_code == 0
    )
    a_file = runner.invoke(cli, ["--bundle", str(smol), "users"])  # a GGUF is not a bundle
    assert a_file.exit_code == 2 and "edge-pllm models add FILE --name NAME" in a_file.output
    a_folder = runner.invoke(cli, [*base, "add", "ann", "-f", str(tmp_path)])
    assert a_folder.exit_code == 2 and "edge-pllm import USER FOLDER" in a_folder.output
    removed = runner.invoke(cli, [*base, "models", "remove", "smol"])
    assert removed.exit_code == 0 and smol.exists()


def test_export_on_a_device_install_names_the_extra(monkeypatch, tmp_path, smol):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as on the device install: not there
    args = ["export", "bundle", "--llm", str(smol), "--embedder", str(tmp_path), "-o", "x"]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 1 and "Traceback" not in done.output
    assert "pip install 'edge-pllm[export]'" in done.output


def test_erased_text_stays_in_no_models_cached_prompt(default_bundle, smol, tmp_path):
    """Runtimes over one store (the server's, one per model): a delete empties the KV cache
    of every one of them, not only of the runtime it was called on."""
    home = tmp_path / "home"
    add_model(home, smol, "smol")
    with runtime(default_bundle, home, None) as pllm:
        twin = pllm.with_model("smol")
        [note] = pllm.add("ann", ["The safe's code is 4711."])
        twin.generate("ann", "What is the safe's code?", strategy="rag:1", sampling=SHORT)
        assert twin.llm.llama.n_tokens > 0  # the note is in the twin's cached prompt
        pllm.delete("ann", [note])
        assert twin.llm.llama.n_tokens == 0


def test_eval_answers_with_the_model_it_is_given(default_bundle, gemma_file, tmp_path):
    from .test_eval import make_task

    pytest.importorskip("rouge_score", reason="ROUGE needs the [eval] extra")
    template = tmp_path / "gemma.jinja"
    template.write_text(GEMMA_TEMPLATE)
    runner = CliRunner()
    base = ["--home", str(tmp_path / "home"), "--bundle", str(default_bundle), "--n-ctx", "1024"]
    add = ["models", "add", str(gemma_file), "--name", "gemma", "--chat-template", str(template)]
    added = runner.invoke(cli, [*base, *add])
    assert added.exit_code == 0, added.output
    task, out = make_task(tmp_path / "task"), tmp_path / "run"
    args = ["eval", str(task), "--limit", "1", "-s", "none", "--no-floors", "--out", str(out)]
    done = runner.invoke(cli, [*base, "--model", "gemma", *args])
    assert done.exit_code == 0, done.output
    # The registered model answered, not the bundle's: the report names its file.
    assert f"bundle: gemma: {gemma_file.name} (Q4_K_M)" in done.output
    assert "`edge-pllm --model gemma eval" in done.output  # reproduce
    plug = [*args[:-4], "none,plug", "--out", str(tmp_path / "plug")]
    refused = runner.invoke(cli, [*base, "--model", "gemma", *plug])
    assert refused.exit_code == 1 and "trained for another model" in refused.output
    assert not (tmp_path / "plug" / "predictions.jsonl").exists()  # said before `none`
    # A run folder holds one model's answers: the bundle's model may not resume gemma's.
    mixed = runner.invoke(cli, [*base, *args])
    assert mixed.exit_code == 1 and "holds the answers of another model" in mixed.output
    assert runner.invoke(cli, [*base, *args[:-2]]).exit_code == 0  # its own default folder
    assert runner.invoke(cli, [*base, "eval", "-m", "gemma", *args[1:-2]]).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "home" / "eval").iterdir()) == ["task", "task@gemma"]
