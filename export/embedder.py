"""Sentence-transformers folder -> ONNX (optimum) -> int8, one of two ways (`QUANTIZATIONS`).

`dynamic` (the default, and the shipped model's): onnxruntime's `quantize_dynamic`, int8
weights per output channel and activations with one scale per tensor, computed at run time.
Per-tensor weights lose too much for MiniLM (cosine 0.955 mean / 0.906 min against fp32,
measured on commit bodies); per-channel keeps about 0.993 / 0.983. One activation scale per
tensor is one per batch, so a text's vector depends on the texts batched with it.

`per-row`: a graph rewrite. Every matrix product with a constant weight becomes int8 weights
per output channel times int8 activations with one scale per row (per token), computed by
plain ONNX ops (abs, max, round) in front of `MatMulInteger`; the token embedding tables
become int8 per row. No token's numbers depend on another row, integer accumulation is
exact, and the fp32 rest (attention, layer norms) works row by row, so a text's vector is
the same alone or in any batch (measured bitwise on 1,000 commit bodies), and closer to fp32
(cosine 0.998 / 0.995). Measured against the dynamic model on 2 cores: one text per run is
10-20% slower (the per-row scales are separate ops); batched as the runtime then does,
short texts (subjects) run ~15% faster and commit bodies (~110 tokens) about 5% slower.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edge_pllm.errors import BundleError, MissingDependencyError
from edge_pllm.files import private_dir
from edge_pllm.inference.embedder import EmbedderConfig

if TYPE_CHECKING:
    import onnx

QUANTIZATIONS = {
    "dynamic": "int8 weights per channel, one activation scale per batch (vectors depend on "
    "the batch: the runtime embeds one text per run)",
    "per-row": "int8 weights per channel, one activation scale per token (batch-invariant: "
    "the runtime batches; closer to fp32; on long texts ~5% slower)",
}
BATCH_INVARIANT_BATCH_SIZE = 16  # the ingest batch recorded for a batch-invariant model


@contextmanager
def quiet_third_party() -> Iterator[None]:
    """Silence the tracer/deprecation chatter of torch, transformers and onnxruntime's
    quantizer (it logs on the root logger); our own progress bars say what is happening."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                from transformers.utils import logging as hf_logging

                verbosity = hf_logging.get_verbosity()
                hf_logging.set_verbosity_error()
            except ImportError:
                hf_logging = None
            try:
                yield
            finally:
                if hf_logging is not None:
                    hf_logging.set_verbosity(verbosity)
    finally:
        root.setLevel(level)


@dataclass(frozen=True)
class ExportedEmbedder:
    """Files and settings of an exported embedder."""

    onnx_fp32: Path
    onnx_int8: Path
    tokenizer: Path
    config: EmbedderConfig


def read_sentence_transformers_config(folder: Path) -> EmbedderConfig:
    """Pooling, normalization, dim and max length as the sentence-transformers folder says."""
    modules_file = folder / "modules.json"
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        raise BundleError(
            f"{folder} is not a sentence-transformers model folder (config.json and "
            "tokenizer.json are needed).",
            file=str(folder),
        )
    modules = json.loads(modules_file.read_text()) if modules_file.is_file() else []
    types = [m.get("type", "") for m in modules]
    pooling, dim = "mean", None
    for module in modules:
        if module.get("type", "").endswith("models.Pooling"):
            cfg = json.loads((folder / module["path"] / "config.json").read_text())
            dim = cfg.get("word_embedding_dimension")
            if cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_max_tokens"):
                pooling = "max"
            elif not cfg.get("pooling_mode_mean_tokens", True):
                raise BundleError(f"Unsupported pooling in {folder}: {cfg}", file=str(folder))
    if dim is None:
        dim = json.loads((folder / "config.json").read_text())["hidden_size"]
    max_len = 256
    sbert = folder / "sentence_bert_config.json"
    if sbert.is_file():
        max_len = json.loads(sbert.read_text()).get("max_seq_length", max_len)
    return EmbedderConfig(
        dim=int(dim),
        pooling=pooling,
        normalize=any(t.endswith("models.Normalize") for t in types),
        max_seq_length=int(max_len),
    )


def export_embedder(
    source: str | Path, out_dir: str | Path, quantization: str = "dynamic"
) -> ExportedEmbedder:
    """Export the sentence-transformers model in `source` to ONNX fp32 and int8 in `out_dir`,
    quantized as `quantization` (a key of `QUANTIZATIONS`) says."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}")
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise MissingDependencyError(
            exc.name or "optimum", "export", "Exporting the embedder"
        ) from exc

    source, out_dir = Path(source), Path(out_dir)
    config = read_sentence_transformers_config(source)
    private_dir(out_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with quiet_third_party(), tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        main_export(
            str(source),
            output=tmp,
            task="feature-extraction",
            library_name="transformers",
            local_files_only=True,
            do_validation=False,
            # per-row's ReduceMax takes its axes as an input (opset 18); dynamic keeps the
            # exporter's default, which the shipped model was made with
            **({"opset": 18} if quantization == "per-row" else {}),
        )
        fp32 = out_dir / "embedder.fp32.onnx"
        shutil.move(str(Path(tmp) / "model.onnx"), fp32)
    int8 = out_dir / "embedder.onnx"
    if quantization == "per-row":
        quantize_per_row(fp32, int8)
        config = replace(config, batch_invariant=True, batch_size=BATCH_INVARIANT_BATCH_SIZE)
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with quiet_third_party():
            quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, per_channel=True)
    tokenizer = out_dir / "tokenizer.json"
    shutil.copyfile(source / "tokenizer.json", tokenizer)
    return ExportedEmbedder(onnx_fp32=fp32, onnx_int8=int8, tokenizer=tokenizer, config=config)


def embedder_manifest_entry(exported: ExportedEmbedder, source: str | Path) -> dict[str, object]:
    """The bundle manifest's `embedder` entry for `exported` (`edge_pllm.inference.bundle`
    parses it)."""
    config = exported.config
    entry: dict[str, object] = {
        "file": exported.onnx_int8.name,
        "tokenizer": exported.tokenizer.name,
        "int8": True,
        "source": Path(source).name,
        "dim": config.dim,
        "pooling": config.pooling,
        "normalize": config.normalize,
        "max_seq_length": config.max_seq_length,
    }
    if config.batch_invariant:
        entry |= {"batch_invariant": True, "batch_size": config.batch_size}
    return entry


def quantize_per_row(fp32: str | Path, out: str | Path) -> int:
    """Write `out`: the ONNX model `fp32` with every MatMul by a constant 2-D weight made
    int8 with per-token activation scales, and every Gather from a constant 2-D table made
    int8 per row (see the module note). Returns how many nodes were rewritten."""
    import onnx

    model = onnx.load(str(fp32))
    count = _rewrite_per_row(model)
    if not count:
        raise BundleError(f"{fp32} has no MatMul with a constant weight to quantize.")
    onnx.save(model, str(out))
    return count


def _rewrite_per_row(model: onnx.ModelProto) -> int:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 18:  # ReduceMax takes its axes as an input from opset 18 on
        raise BundleError(f"per-row quantization needs ONNX opset 18 or later (this is {opset}).")
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    added: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        added.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def matrix(name: str) -> np.ndarray | None:
        """The constant float32 2-D weight named `name`, if it is one."""
        if name not in weights:
            return None
        value = numpy_helper.to_array(weights[name])
        return value if value.ndim == 2 and value.dtype == np.float32 else None

    def int8_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Symmetric int8 of `w` with one scale per column."""
        scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
        return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale.astype(np.float32)

    c127, eps = const("rowq/127", np.float32(127)), const("rowq/eps", np.float32(1e-12))
    c128, zero = const("rowq/128", np.float32(128)), const("rowq/zero_point", np.uint8(128))
    last_axis = const("rowq/last_axis", np.array([-1], dtype=np.int64))
    quantized: dict[str, tuple[str, str]] = {}  # an activation's uint8 rows and their scales

    def rows_uint8(x: str) -> tuple[str, str]:
        """`x` as uint8 (zero point 128) with one scale per row, once per activation: Q, K
        and V read the same one."""
        if x not in quantized:
            p = f"rowq/{len(quantized)}/"
            absx = node("Abs", [x], p + "abs")
            amax = node("ReduceMax", [absx, last_axis], p + "amax", keepdims=1)
            amax = node("Max", [amax, eps], p + "amax_eps")
            scaled = node("Mul", [x, node("Div", [c127, amax], p + "inv_scale")], p + "scaled")
            # |round(scaled)| <= 127, so +128 fits uint8 without a clip
            shifted = node("Add", [node("Round", [scaled], p + "round"), c128], p + "shifted")
            xq = node("Cast", [shifted], p + "uint8", to=TensorProto.UINT8)
            quantized[x] = (xq, node("Div", [amax, c127], p + "scale"))
        return quantized[x]

    count = 0
    for n in graph.node:
        w = matrix(n.input[1]) if n.op_type == "MatMul" else None
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        table = matrix(n.input[0]) if n.op_type == "Gather" and axis == 0 else None
        p = f"rowq/{n.name or n.output[0]}/"
        if w is not None:
            wq, w_scale = int8_columns(w)
            xq, x_scale = rows_uint8(n.input[0])
            acc = node("MatMulInteger", [xq, const(p + "w", wq), zero], p + "int32")
            y = node(
                "Mul", [node("Cast", [acc], p + "float", to=TensorProto.FLOAT), x_scale], p + "y"
            )
            node("Mul", [y, const(p + "w_scale", w_scale)], n.output[0])
        elif table is not None:
            tq, t_scale = int8_columns(table.T)
            rows = node("Gather", [const(p + "table", tq.T), n.input[1]], p + "rows")
            scales = node("Gather", [const(p + "scale", t_scale), n.input[1]], p + "scales")
            rows = node("Cast", [rows], p + "float", to=TensorProto.FLOAT)
            unsqueezed = node("Unsqueeze", [scales, last_axis], p + "scales_col")
            node("Mul", [rows, unsqueezed], n.output[0])
        else:
            nodes.append(n)
            continue
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in [*graph.initializer, *added] if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return count


REPORT_SENTENCES = [
    "Fix the crash when the config file is empty.",
    "Add a --json flag to the status command.",
    "docs: explain how the cache is invalidated",
    "Refactor the store so that vectors and rows are written in one transaction.",
    "BUG: fix undefined macro on big-endian platforms",
    "Bump the minimum supported Python to 3.11.",
    "Was heißt das auf Deutsch? Ça marche très bien.",
    "MAINT: update the vendored meson to 1.4",
    "Remove a stray debug print from the parser.",
    "ENH: add axis keyword to unique",
    "TST: mark the network tests as slow",
    "git-gui: fix typo in the commit dialog",
    "CI: cache pip downloads between runs",
    "scipy.optimize: guard against division by zero in line search",
    "Teach `git log` to show notes by default.",
    "Lower the memory use of rev-list on large repositories.",
]


def _sample_corpus() -> list[str]:
    from importlib import resources

    sample = resources.files("edge_pllm").joinpath("sample_history.jsonl")
    with sample.open("r", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def embedder_report(
    source: str | Path, exported: ExportedEmbedder, texts: list[str] | None = None, k: int = 5
) -> dict[str, object]:
    """Cosine of ONNX fp32 and int8 against sentence-transformers fp32, top-k retrieval
    overlap on a small corpus, and encode throughput of each (same texts, same process)."""
    import time

    import numpy as np
    from sentence_transformers import SentenceTransformer

    from edge_pllm.inference.embedder import Embedder

    corpus = texts or [*REPORT_SENTENCES, *_sample_corpus()]
    queries = REPORT_SENTENCES
    with quiet_third_party():
        st = SentenceTransformer(str(source), device="cpu")

    def timed(fn) -> tuple[np.ndarray, float]:  # type: ignore[no-untyped-def]
        fn(corpus[:4])  # warm-up: first-call costs are not throughput
        started = time.perf_counter()
        out = fn(corpus)
        return np.asarray(out, dtype=np.float32), len(corpus) / (time.perf_counter() - started)

    ref, st_rate = timed(lambda t: st.encode(t, normalize_embeddings=True, batch_size=32))
    report: dict[str, object] = {"texts": len(corpus), "sentence_transformers_items_per_s": st_rate}
    ref_q = np.asarray(st.encode(queries, normalize_embeddings=True), dtype=np.float32)
    ref_top = np.argsort(-ref_q @ ref.T, axis=1)[:, :k]
    for name, path in (("fp32", exported.onnx_fp32), ("int8", exported.onnx_int8)):
        emb = Embedder(path, exported.tokenizer, exported.config)
        vecs, rate = timed(emb.embed)
        cos = (vecs * ref).sum(axis=1)
        top = np.argsort(-emb.embed(queries) @ vecs.T, axis=1)[:, :k]
        overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top, ref_top, strict=True)])
        report[name] = {
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            f"top{k}_overlap": float(overlap),
            "items_per_s": rate,
            "speed_vs_sentence_transformers": rate / st_rate,
            "file_size": path.stat().st_size,
        }
    return report
