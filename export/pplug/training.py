"""Training the head against the frozen LLM: set up, resume, step, save.

LLM and history encoder frozen; cross-entropy on the gold output with teacher forcing; AdamW
with warmup and linear decay (a trainable input encoder at its own, smaller learning rate);
history-dropout augmentation (copies of each example that drop a random 1–50 % of the
history); optionally (`rag`) a share of the examples shown with their k nearest history
items in the prompt, as plug+rag shows them. With the soft tokens before the answer
(`placement`), each request's keys and values are computed once (`frozen.FrozenPrefix`)
and each step runs the LLM over the soft tokens, the answer's header and the answer only.

Under a launcher (`torchrun`, `accelerate launch`: WORLD_SIZE > 1) each process takes its
share of every step's examples and the gradients are summed over the processes
(`distributed`); the head, the loss and the checkpoint are those of one process training
with the same --batch-size, which is the whole step's, whatever the number of processes.
"""

from __future__ import annotations

import io
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from edge_pllm.cpus import compute_threads, cpu_bound
from edge_pllm.decoding.answers import AnswerReader
from edge_pllm.errors import InvalidInputError
from edge_pllm.files import atomic_write, private_dir
from edge_pllm.inference.bundle import Bundle, load_bundle
from edge_pllm.inference.embedder import Embedder
from edge_pllm.inference.llm import LLM, LLMConfig
from edge_pllm.personalization.head import QueryTokenizer
from edge_pllm.storage.vector_cache import cache_key
from edge_pllm.tasks.lamp import TaskSpec

from .config import TrainConfig, flag_of
from .data import Encoded, Example, PromptEncoder, VectorTable, retrieve, vector_cache
from .distributed import World, join
from .frozen import (
    FrozenPrefix,
    check_input_encoder,
    load_frozen_llm,
    load_input_encoder,
    token_embedding_norm,
    token_losses,
)
from .model import HeadConfig, PPlugHead
from .outcome import (
    answer_log_probs,
    answer_scores,
    outcome_loss,
    sample_answers,
)
from .validation import Validation, soft_tokens, validate, validation_examples

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    device: str = ""  # what the steps of this run ran on (device_label)
    validation: Validation | None = None
    examples_per_hour: float = 0.0  # training examples (own-history passes) per wall hour
    setup_seconds: float = 0.0  # loading, embedding and the requests' keys and values
    final_score: float | None = None  # --outcome-samples: sampled answers' ROUGE-1, last 20 steps


def resolve_device(name: str) -> torch.device:
    """The torch device to train on: "auto" picks a CUDA GPU when torch sees one, else the
    CPU; a device torch cannot use here is refused with what to do instead. Under a
    launcher, "auto" and "cuda" are the GPU of the process's LOCAL_RANK."""
    if name == "auto":
        return _local_gpu(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidInputError(
            f"Unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps.", field="device"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count or (device.index is not None and device.index >= count):
            raise InvalidInputError(
                f"Device {name!r} is not available: torch sees {count} CUDA GPU(s) "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
                "Install a CUDA build of torch on a GPU machine, or train with --device cpu.",
                field="device",
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError(
            "Device 'mps' is not available: torch sees no Apple GPU. Train with --device cpu.",
            field="device",
        )
    elif device.type not in ("cpu", "mps"):
        raise InvalidInputError(
            f"Training on {device.type!r} is not supported: use auto, cpu, cuda, cuda:N or mps.",
            field="device",
        )
    return _local_gpu(device)


def _local_gpu(device: torch.device) -> torch.device:
    """`device`, or under a launcher the GPU of this process's LOCAL_RANK for "cuda" (the
    only GPU when a launcher shows each process one)."""
    world = World.from_env()
    if device.type != "cuda" or device.index is not None or world.size == 1:
        return device
    count = torch.cuda.device_count()
    if world.local_rank < count:
        return torch.device("cuda", world.local_rank)
    if count == 1:
        return torch.device("cuda", 0)
    raise InvalidInputError(
        f"Process {world.local_rank} of {world.local_size} on this machine has no GPU: torch "
        f"sees {count}. Start at most {count} processes per machine (--nproc_per_node).",
        field="device",
    )


def device_label(device: torch.device) -> str:
    """How the device is recorded with a trained head, e.g. "cuda (NVIDIA H100 80GB HBM3)"."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        return "mps (Apple GPU)"
    return f"cpu ({torch.get_num_threads()} threads)"


@dataclass
class Session:
    """Everything a training run holds: the frozen models, the data in the forms each step
    reads, the head and its optimizer."""

    config: TrainConfig
    bundle: Bundle
    device: torch.device
    llm: torch.nn.Module
    embed_scale: float
    examples: list[Example]
    table: VectorTable
    encode: PromptEncoder
    encoded: list[Encoded]
    prefixes: FrozenPrefix
    encoded_rag: list[Encoded]
    prefixes_rag: FrozenPrefix | None
    head: PPlugHead
    query_inputs: Callable[[list[str]], tuple[torch.Tensor, ...]]
    opt: torch.optim.AdamW
    sched: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    losses: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # --outcome-samples: each step's mean
    seconds: float = 0.0  # training time of earlier runs (resumed)
    world: World = field(default_factory=World)  # the training processes (one: World())
    reader: AnswerReader | None = None  # --outcome-samples: how the device reads an answer
    penalty: Callable[[], torch.Tensor] | None = None  # added to each step's loss (FedProx)


def _optimizer(head: PPlugHead, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the head; a trainable input encoder in its own group at `encoder_lr`, a
    task adapter in its own at `adapter_lr`."""
    encoder = list(head.query_encoder.parameters())
    if head.config.input_encoder != "trainable":
        encoder = []
    adapter = list(head.adapter.parameters()) if head.adapter is not None else []
    apart = {id(p) for p in [*encoder, *adapter]}
    head_params = [p for p in head.parameters() if id(p) not in apart]
    groups: list[dict[str, Any]] = [{"params": head_params}]
    if encoder:
        groups.append({"params": encoder, "lr": config.encoder_lr})
    if adapter:
        groups.append({"params": adapter, "lr": config.adapter_lr})
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _schedule(opt: torch.optim.AdamW, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, int(config.warmup * config.steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (config.steps - step) / max(1, config.steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def setup(
    bundle_dir: str | Path,
    examples: list[Example],
    spec: TaskSpec,
    config: TrainConfig,
    home_dir: Path,
    validation: Sequence[Example] = (),
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    world: World | None = None,
    llm: torch.nn.Module | None = None,
    trains: bool = True,
) -> Session:
    """Load the frozen models, embed the histories (cached in `home_dir`), encode the
    prompts, compute the requests' keys and values, and build a fresh head.

    With several processes (`world`), each machine's first process embeds the histories
    while the others wait, then they read the cache; the requests' keys and values are
    computed in shares (one per process of a machine) into the cache, then read by all.
    `llm`: the frozen LLM `load_frozen_llm` gives for this bundle and config, already loaded
    (federated clients of one process share it). `trains=False` (a federated server, whose
    clients train): the examples' prompts and keys and values are not made, only the head."""
    if not examples:
        raise InvalidInputError("No training examples: check the task folder and split.")
    world = world or World()
    progress = progress and world.is_main
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    elif cpu_bound() is not None:  # `edge-pllm --threads N` or a container quota: fewer only
        torch.set_num_threads(min(torch.get_num_threads(), compute_threads()))
    bundle = load_bundle(bundle_dir)
    emb = bundle.embedder
    embedder = Embedder(bundle.file(emb.file), bundle.file(emb.tokenizer), emb.config)
    runtime = LLM(bundle.file(bundle.llm.file), LLMConfig(n_ctx=512))
    if config.adapter_rank and runtime.architecture != "llama":
        raise InvalidInputError(
            f"A task adapter is supported for Llama-family LLMs; this bundle's is "
            f"{runtime.architecture!r}. Train without --adapter-rank.",
            field="adapter_rank",
        )
    if llm is None:
        llm = load_frozen_llm(bundle, Path(config.llm_source) if config.llm_source else None)
    # Measured on the CPU before the move: the same float whatever the training device.
    embed_norm = token_embedding_norm(llm) / runtime.embed_scale
    llm.to(device)
    trainable = config.input_encoder == "trainable"
    # Retrieval (config.rag) searches the whole history, as the store does at run time.
    first = 0 if config.rag else -config.max_history
    texts = [t for e in [*examples, *validation] for t in e.texts[first:]]
    if not trainable or config.rag:
        texts += [e.query for e in [*examples, *validation]]
    with world.local_first(), vector_cache(home_dir, bundle, embedder) as cache:
        table = VectorTable(cache, texts)
    encode = PromptEncoder(runtime, spec, config.max_prompt_tokens, config.placement)
    trained = examples if trains else []
    encoded = [encode(e) for e in trained]
    # plug+rag: the same examples with their k nearest history items shown in the prompt.
    encoded_rag = [encode(e, retrieve(e, table, config.rag)) for e in trained] if config.rag else []
    # The requests' keys and values, kept per LLM (and its source) in <home>/cache.
    llm_key = bundle.manifest["files"][bundle.llm.file]["sha256"]
    if config.llm_source:
        llm_key = cache_key(str(Path(config.llm_source).resolve()))
    kv_dir = home_dir / "cache" / f"prefix-{llm_key[:16]}"
    if world.size > 1:  # each process of a machine its share (files written atomically)
        share = [*encoded, *encoded_rag][world.local_rank :: world.local_size]
        FrozenPrefix(llm, share, progress, kv_dir)
        world.barrier()
    prefixes = FrozenPrefix(llm, encoded, progress, kv_dir)
    prefixes_rag = FrozenPrefix(llm, encoded_rag, progress, kv_dir) if config.rag else None
    if log and trains:
        log(f"requests' keys and values: {prefixes.nbytes / 1e9:.2f} GB (fp16)")

    head_config = HeadConfig(
        d_enc=emb.config.dim,
        d_llm=runtime.n_embd,
        embed_norm=embed_norm,
        max_history=config.max_history,
        input_encoder=config.input_encoder,  # type: ignore[arg-type]
        n_persona=config.persona_tokens,
        n_task=config.task_tokens,
        attention_scale=config.scale,
        center=config.center,
        placement=config.placement,
        adapter_rank=config.adapter_rank,
        pooling=emb.config.pooling,
        normalize=emb.config.normalize,
        max_seq_length=emb.config.max_seq_length,
    )
    torch.manual_seed(config.seed)
    if trainable:
        source = Path(config.encoder_source) if config.encoder_source else None
        head = PPlugHead(head_config, load_input_encoder(bundle, source))
        tokenize = QueryTokenizer(bundle.file(emb.tokenizer), head_config.max_seq_length)
        cosine = check_input_encoder(head, tokenize, embedder, [e.query for e in examples[:8]])
        if log:
            log(f"trainable input encoder agrees with the bundle's embedder: cosine {cosine:.3f}")

        def query_inputs(queries: list[str]) -> tuple[torch.Tensor, ...]:
            return tuple(torch.from_numpy(a).to(device) for a in tokenize(queries))
    else:
        head = PPlugHead(head_config)

        def query_inputs(queries: list[str]) -> tuple[torch.Tensor, ...]:
            return (torch.from_numpy(table(queries)).to(device),)

    if config.adapter_rank:
        head.add_adapter(llm)
    if config.center:  # μ over every training user's history, each item once
        seen = list(dict.fromkeys(t for e in examples for t in e.texts[-config.max_history :]))
        head.set_history_mean(torch.from_numpy(table(seen)))
    head.to(device)
    opt = _optimizer(head, config)
    reader = (
        AnswerReader.of(runtime, spec.clean, spec.style.one_line)
        if config.outcome_samples
        else None
    )
    return Session(
        config, bundle, device, llm, runtime.embed_scale, examples, table, encode, encoded,
        prefixes, encoded_rag, prefixes_rag, head, query_inputs, opt, _schedule(opt, config),
        world=world, reader=reader,
    )  # fmt: skip


def resume(session: Session, out_dir: Path) -> None:
    """Continue from the checkpoint in `out_dir`, if there is one (from any device, and any
    number of processes); one of another head configuration, or of another batch size
    (the whole step's), is refused. Without one, a head named by `init_from` is the start
    (its weights only). With several processes, rank 0 reads it and hands it to the others,
    and every process starts from rank 0's head."""
    world, config = session.world, session.config
    ckpt = out_dir / CHECKPOINT
    state = start = None
    if world.is_main and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    elif world.is_main and config.init_from:
        start = _read_init(Path(config.init_from))
    state, start = world.broadcast_object((state, start))
    if state is None:
        random.seed(config.seed)
        if start is not None:
            _check_head(session, start, Path(config.init_from or ""), "init_from")
            session.head.load_state_dict(upgrade_state(start["head"]))
    else:
        _load(session, state, out_dir)
    world.broadcast_module_(session.head)
    if world.size > 1:
        # Each process its own stream for what draws from torch's generator in a step (the
        # trainable encoder's dropout, sampled answers): reproducible for the same number
        # of processes.
        seeds = np.random.SeedSequence([config.seed & 0xFFFFFFFF, session.step, world.rank])
        torch.manual_seed(int(seeds.generate_state(1)[0]))


def check_init(config: TrainConfig) -> None:
    """Refuse an --init-from folder without a checkpoint (every process, before anything
    is written)."""
    if config.init_from and not (Path(config.init_from) / CHECKPOINT).is_file():
        raise InvalidInputError(
            f"{config.init_from} holds no {CHECKPOINT}: pass --init-from the folder a "
            "train-plug run trained into (its --out).",
            field="init_from",
        )


def _read_init(folder: Path) -> dict[str, Any]:
    """The head's weights and configuration of the checkpoint in `folder`."""
    state = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=False)
    return {"head": state["head"], "head_config": state.get("head_config", {})}


def _check_head(session: Session, state: dict[str, Any], where: Path, field: str) -> None:
    """Refuse a saved head of another configuration than the session's."""
    head_config = session.head.config
    saved = HeadConfig(**state.get("head_config", {}))
    same_norm = math.isclose(saved.embed_norm, head_config.embed_norm, rel_tol=1e-5)
    if not same_norm or replace(saved, embed_norm=head_config.embed_norm) != head_config:
        hint = (
            f"train into another folder or delete {CHECKPOINT}"
            if field == "out_dir"
            else "train with that head's settings, or start from another folder"
        )
        raise InvalidInputError(
            f"The checkpoint in {where} is of another head ({saved}, now {head_config}); {hint}.",
            field=field,
        )


def _load(session: Session, state: dict[str, Any], out_dir: Path) -> None:
    ckpt = out_dir / CHECKPOINT
    saved_batch = state.get("batch_size")  # older checkpoints did not say
    if saved_batch is not None and saved_batch != session.config.batch_size:
        trained_on = state.get("world_size", 1)
        raise InvalidInputError(
            f"The checkpoint in {out_dir} was trained with --batch-size {saved_batch} (the "
            f"examples of a step across all processes; it ran on {trained_on}); this run's "
            f"is {session.config.batch_size}. Resume with --batch-size {saved_batch}, with "
            f"any number of processes, or train into another folder or delete {ckpt.name}.",
            field="batch_size",
        )
    _check_head(session, state, out_dir, "out_dir")
    _check_settings(session.config, state.get("config"), out_dir)
    session.head.load_state_dict(upgrade_state(state["head"]))
    session.opt.load_state_dict(state["opt"])
    fit_optimizer_state(session.opt)
    session.sched.load_state_dict(state["sched"])
    session.step, session.losses, session.seconds = state["step"], state["losses"], state["seconds"]
    session.scores = state.get("scores", [])
    random.setstate(state["py_rng"])
    # The trainable encoder's dropout (CUDA's generator on a GPU) and the sampled answers
    # draw from torch's.
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    if session.device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], session.device)


def _check_settings(config: TrainConfig, saved: dict[str, Any] | None, out_dir: Path) -> None:
    """Refuse to resume with settings that decide the head (older checkpoints did not keep
    them): a run continued with another learning rate, number of steps or choice of
    examples would be neither the run it started as nor the one its recorded command
    reproduces."""
    if saved is None:
        return
    now = config.decisive()
    changed = [name for name in now if name in saved and saved[name] != now[name]]
    if changed:
        said = ", ".join(
            f"{flag_of(name)} {_shown(saved[name])} (now {_shown(now[name])})" for name in changed
        )
        raise InvalidInputError(
            f"The checkpoint in {out_dir} was trained with {said}. Resume with the settings "
            f"it was trained with, or train into another folder (--init-from {out_dir} "
            "starts from its head, with a fresh optimizer and schedule).",
            field=changed[0],
        )


def _shown(value: Any) -> str:
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return "unset" if value is None else str(value)


def upgrade_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A head state dict from an older head: `query_map` (before the input-encoder option)
    is the linear encoder; no `history_mean` (before centring) is a zero mean; a single
    `instruction` vector (before task tokens) is one task token."""
    state = {k.replace("query_map.", "query_encoder.", 1): v for k, v in state.items()}
    instruction = state.get("instruction")
    if instruction is not None and instruction.dim() == 1:
        state.setdefault("history_mean", torch.zeros_like(instruction))
        state["instruction"] = instruction.unsqueeze(0)
    return state


def fit_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """The optimizer's moments in their parameter's shape: a parameter `upgrade_state`
    reshaped (one instruction vector -> one task token) kept its old moments' shape, which
    `load_state_dict` does not check and the first step would refuse."""
    for param, moments in opt.state.items():
        for name, value in moments.items():
            if (
                isinstance(value, torch.Tensor)
                and value.shape != param.shape
                and value.numel() == param.numel()
            ):
                moments[name] = value.reshape(param.shape)


def save(session: Session, out_dir: Path, seconds: float) -> None:
    """Write the checkpoint (head, optimizer, schedule, random states) for `resume`, in
    one step (an interrupted write leaves the previous one). The step and the batch size
    are the whole run's, whatever the number of processes (rank 0's random states)."""
    device = session.device
    buffer = io.BytesIO()
    torch.save(
        {
            "head": session.head.state_dict(),
            "opt": session.opt.state_dict(),
            "sched": session.sched.state_dict(),
            "step": session.step,
            "losses": session.losses,
            "scores": session.scores,
            "seconds": seconds,
            "py_rng": random.getstate(),
            "torch_rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
            "head_config": asdict(session.head.config),
            "batch_size": session.config.batch_size,
            "config": session.config.decisive(),
            "world_size": session.world.size,
        },
        buffer,
    )
    atomic_write(out_dir / CHECKPOINT, buffer.getvalue())


def _history(hist: list[str], config: TrainConfig) -> list[str]:
    """The newest `max_history` items; in `dropout_copies` of every `dropout_copies + 1`
    draws, 1-50 % of them dropped (the paper's history-dropout augmentation)."""
    hist = hist[-config.max_history :]
    if random.random() < config.dropout_copies / (config.dropout_copies + 1) and len(hist) > 1:
        keep = max(1, round(len(hist) * (1 - random.uniform(0.01, 0.5))))
        hist = [hist[i] for i in sorted(random.sample(range(len(hist)), keep))]
    return hist


@dataclass(frozen=True)
class Draw:
    """One example of a step: which, its history (after dropout), shown with retrieval."""

    index: int
    history: list[str]
    rag: bool


def draw_batch(examples: Sequence[Example], config: TrainConfig, rag: bool) -> list[Draw]:
    """A step's whole batch (`config.batch_size` examples), drawn from `random`: every
    process draws all of it, in the order one process does, so the random streams stay
    the same everywhere and each process takes its share (`World.shard`)."""
    idx = [random.randrange(len(examples)) for _ in range(config.batch_size)]
    hists = [_history(examples[i].texts, config) for i in idx]
    with_rag = [rag and random.random() < config.rag_fraction for _ in idx]
    return [Draw(*d) for d in zip(idx, hists, with_rag, strict=True)]


def train_step(session: Session) -> float:
    """One optimizer step on a random batch; returns its cross-entropy (nats per target
    token; with --outcome-samples the step's mean answer score goes to `session.scores`).

    With several processes each runs its share of the batch; each share's loss sum is
    divided by the whole batch's target tokens and the gradients are summed, which is the
    gradient of the batch's mean loss in one process (up to the order of float sums; the
    sampled answers are each process's own draws)."""
    s, config, world = session, session.config, session.world
    mine = draw_batch(s.examples, config, bool(s.encoded_rag))[world.shard(config.batch_size)]
    hists = [s.table(d.history) for d in mine]
    query = s.query_inputs([s.examples[d.index].query for d in mine])
    prompts = [s.encoded_rag[d.index] if d.rag else s.encoded[d.index] for d in mine]
    prefixes = [
        s.prefixes_rag[d.index] if d.rag and s.prefixes_rag else s.prefixes[d.index] for d in mine
    ]
    soft = soft_tokens(s.head, query, hists)
    losses, mask = token_losses(s.llm, prompts, soft, s.embed_scale, prefixes)
    if world.size == 1:
        loss = losses.sum() / mask.sum()
        whole = loss.detach()
    else:  # the whole batch's loss sum and target tokens
        total = losses.sum()
        sums = world.all_reduce_(torch.stack([total.detach(), mask.sum().to(total.dtype)]))
        loss, whole = total / sums[1], sums[0] / sums[1]
    if config.outcome_samples and s.reader is not None:
        k = config.outcome_samples
        answers, _ = sample_answers(
            s.llm, prompts, prefixes, soft.detach(), s.embed_scale, k, s.reader
        )
        golds = [s.examples[d.index].target for d in mine for _ in range(k)]
        scores = answer_scores(answers, golds, s.reader)
        logp = answer_log_probs(s.llm, prompts, prefixes, soft, s.embed_scale, answers)
        term = outcome_loss(logp, scores, k)
        loss = loss + config.outcome_weight * term / config.batch_size
        # the whole batch's mean score (each process scored its share)
        summed = world.all_reduce_(
            torch.tensor([float(scores.sum()), len(scores)], device=s.device)
        )
        s.scores.append(float(summed[0] / summed[1]))
    if s.penalty is not None:
        loss = loss + s.penalty()
    s.opt.zero_grad()
    loss.backward()
    params = [p for group in s.opt.param_groups for p in group["params"]]
    world.sum_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    s.opt.step()
    s.sched.step()
    s.step += 1
    s.losses.append(whole.item())
    return s.losses[-1]


def train(
    bundle_dir: str | Path,
    examples: list[Example],
    spec: TaskSpec,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    home_dir: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    validation: Sequence[Example] = (),
) -> tuple[PPlugHead, TrainResult]:
    """Train a head for the bundle's LLM and embedder on `examples`; resumes from out_dir
    (a checkpoint there must be of the same head configuration, from any device). The head
    returned is on the CPU. With `validation` examples (held out: another split), the
    trained head's held-out losses are measured and returned in the result.

    Under a launcher (WORLD_SIZE > 1) every process calls this alike: they share each step
    (see `train_step`); only rank 0 writes the checkpoint, logs and shows progress; the
    validation is shared out and gathered; every process returns the same head."""
    config = config or TrainConfig()
    # an unusable device is refused before anything is written
    world = join(resolve_device(config.device))
    world.check_batch(config.batch_size)
    check_init(config)
    progress, log = progress and world.is_main, log if world.is_main else None
    if validation:
        validation = validation_examples(validation)
    out_dir = Path(out_dir)
    private_dir(out_dir)
    started = time.perf_counter()
    s = setup(
        bundle_dir, examples, spec, config, home_dir or out_dir, validation, progress, log, world
    )
    setup_seconds = time.perf_counter() - started
    resume(s, out_dir)
    bar = tqdm(
        total=config.steps, initial=s.step, desc="Training PPlug head", unit="step",
        disable=not progress,
    )  # fmt: skip
    started, first = time.perf_counter(), s.step
    s.head.train()
    with bar:
        while s.step < config.steps:
            train_step(s)
            shown = {"loss": f"{np.mean(s.losses[-20:]):.3f}"}
            if s.scores:
                shown["rouge1"] = f"{np.mean(s.scores[-20:]):.3f}"
            bar.set_postfix(shown)
            bar.update()
            if world.is_main and (s.step % config.checkpoint_every == 0 or s.step == config.steps):
                save(s, out_dir, s.seconds + time.perf_counter() - started)
    run_seconds = time.perf_counter() - started
    seconds = s.seconds + run_seconds
    checked = None
    if validation:
        checked = validate(
            s.head,
            s.llm,
            validation,
            s.encode,
            s.table,
            s.query_inputs,
            s.embed_scale,
            world=world,
        )
        if log:
            log(checked.summary())
    s.head.eval().cpu()  # exported and compared on the CPU, as the device runs it
    done = (s.step - first) * config.batch_size
    label = device_label(s.device)
    result = TrainResult(
        config.steps,
        seconds,
        float(np.mean(s.losses[-20:])) if s.losses else 0.0,
        s.losses,
        label if world.size == 1 else f"{label} × {world.size} processes",
        checked,
        examples_per_hour=done / run_seconds * 3600 if run_seconds > 0 and done else 0.0,
        setup_seconds=setup_seconds,
        final_score=float(np.mean(s.scores[-20:])) if s.scores else None,
    )
    if log:
        log(f"trained {config.steps} steps in {seconds:.0f} s, final loss {result.final_loss:.3f}")
    return s.head, result
