"""Base LLM export: Hugging Face folder -> GGUF f16 -> quantized GGUF, each with a parity report.

- `convert_hf`: our own converter for the llama family (Llama, SmolLM2), written
  with the `gguf` package's writer, tensor-name map and vocab helpers; or llama.cpp's own
  `convert_hf_to_gguf.py` when the caller points at one (`script=`).
- `quantize`: llama.cpp's quantizer through llama-cpp-python (`llama_model_quantize`).
- `parity_report`: next-token logits of the GGUF (llama.cpp) against the fp32 source
  (transformers) on fixed prompts: top-1 agreement, mean KL, max |Δlogit|, perplexity of
  a text sample on both sides, file size and load time.

Every file is written under a temporary name and renamed when complete, so a failure
(a full disk included) never leaves a half file under the final name.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np

from edge_pllm.errors import BundleError, ExportError, InvalidInputError, MissingDependencyError
from edge_pllm.files import atomic_write, private_dir, replacing

# llama.cpp's pre-tokenizer ids, keyed by the sha256 of the token ids of CHKTXT under the
# model's Hugging Face tokenizer (the same fingerprint llama.cpp's converter uses).
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
# Only what the tests prove; other architectures go through llama.cpp's script (script=).
ARCHITECTURES = {"LlamaForCausalLM": "llama"}
# File types a quantization may start from without loss of what was already lost.
HIGH_PRECISION = {"ALL_F32", "MOSTLY_F16", "MOSTLY_BF16", "MOSTLY_Q8_0"}

PARITY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "fix(parser): handle blank lines at the end of the file\n\nThe parser",
    "Once upon a time, in a small village by the sea, there lived",
    "Write a commit subject for: the cache was never invalidated after a write.",
    "1, 2, 3, 4, 5, 6,",
    "Les pommes sont rouges et les bananes sont",
    "SELECT name, email FROM users WHERE",
]
PERPLEXITY_TEXT = (
    "A personalized language model adapts its answers to the person who asks. Instead of "
    "training a separate model for every user, Persona-Plug keeps the language model frozen "
    "and summarizes each user's history into a single embedding, which is placed in front "
    "of the prompt as a soft token. The history stays on the device, in a local database, "
    "and only the small projection that turns history vectors into soft tokens is trained. "
    "Retrieval-augmented prompting is the usual baseline: it searches the user's history "
    "for the most similar items and shows them to the model as examples."
)


@contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence C-level stderr (llama.cpp's loader and quantizer logs) for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextmanager
def atomic_output(dest: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; move it to `dest` only if the block succeeds."""
    if dest.exists() and not overwrite:
        raise InvalidInputError(f"{dest} already exists; pass --overwrite to replace it.")
    private_dir(dest.parent)
    with replacing(dest) as tmp:
        yield tmp


def _need(module: str, purpose: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise MissingDependencyError(module, "export", purpose) from exc


# --- HF -> GGUF ------------------------------------------------------------------------------


def read_hf_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InvalidInputError(
            f"{folder} is not a Hugging Face model folder (no config.json); give a folder with "
            "config.json, *.safetensors and tokenizer.json, or a GGUF file."
        )
    cfg = json.loads(cfg_path.read_text())
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise InvalidInputError(
            f"Unsupported architecture {arch} in {folder}; this converter handles "
            f"{', '.join(ARCHITECTURES)} (or pass the path of llama.cpp's convert_hf_to_gguf.py)."
        )
    if not list(folder.glob("*.safetensors")):
        raise InvalidInputError(f"No *.safetensors weights in {folder}.")
    if not (folder / "tokenizer.json").is_file():
        raise InvalidInputError(f"No tokenizer.json in {folder}.")
    return cfg


def pre_tokenizer_name(folder: Path) -> str:
    """llama.cpp's name for the model's BPE pre-tokenizer, from the CHKTXT fingerprint."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(
        CHKTXT, add_special_tokens=False
    )
    digest = sha256(str(ids.ids).encode()).hexdigest()
    if digest not in KNOWN_PRE:
        raise ExportError(
            f"The tokenizer of {folder} has an unknown pre-tokenizer (fingerprint {digest[:12]}); "
            "pass pre= (a llama.cpp pre-tokenizer name) or use llama.cpp's converter script."
        )
    return KNOWN_PRE[digest]


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """HF's rotate-half q/k layout -> llama.cpp's interleaved RoPE layout (llama family)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    safetensors = _need("safetensors.numpy", "Reading safetensors weights")
    for path in sorted(folder.glob("*.safetensors")):
        weights = safetensors.load_file(str(path))
        yield from weights.items()


def _load_tensors_torch(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """bf16 weights cannot be read by numpy; read them with torch and upcast."""
    torch = _need("torch", "Reading bf16 safetensors")
    from safetensors.torch import load_file

    for path in sorted(folder.glob("*.safetensors")):
        for name, t in load_file(str(path)).items():
            yield name, t.to(torch.float32).numpy()


def convert_hf(
    folder: str | Path,
    dest: str | Path,
    *,
    outtype: str = "f16",
    pre: str | None = None,
    overwrite: bool = False,
    script: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Convert a Hugging Face causal-LM folder to a GGUF file (f16 or f32)."""
    folder, dest = Path(folder), Path(dest)
    if script is not None:
        return _convert_with_script(Path(script), folder, dest, outtype, overwrite)
    gguf = _need("gguf", "Writing GGUF")
    from tqdm.auto import tqdm

    cfg = read_hf_config(folder)
    arch = ARCHITECTURES[cfg["architectures"][0]]
    n_head = cfg["num_attention_heads"]
    n_head_kv = cfg.get("num_key_value_heads", n_head)
    n_layer = cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    if outtype not in ("f16", "f32"):
        raise InvalidInputError(
            f"outtype must be f16 or f32, not {outtype!r}; quantize afterwards."
        )
    dtype = np.float16 if outtype == "f16" else np.float32
    file_type = gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layer)
    with atomic_output(dest, overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(folder.name)
        writer.add_context_length(cfg.get("max_position_embeddings", 2048))
        writer.add_embedding_length(cfg["hidden_size"])
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(cfg["intermediate_size"])
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(cfg["vocab_size"])
        writer.add_file_type(file_type)
        _add_vocab(gguf, writer, folder, cfg["vocab_size"], pre or pre_tokenizer_name(folder))

        try:
            tensors = dict(_tensors(folder))
        except (TypeError, ValueError):
            tensors = dict(_load_tensors_torch(folder))
        if "lm_head.weight" not in tensors and not cfg.get("tie_word_embeddings", False):
            raise InvalidInputError(f"{folder} has no lm_head.weight and untied embeddings.")
        for hf_name, data in tqdm(tensors.items(), desc="Converting", unit="tensor",
                                  disable=not progress, leave=False):  # fmt: skip
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings", False):
                continue
            data = np.asarray(data, dtype=np.float32)
            if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                kv = n_head if hf_name.endswith("q_proj.weight") else n_head_kv
                data = _permute(data, n_head, kv)
            gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ExportError(f"No GGUF name for tensor {hf_name} of a {arch} model.")
            # Norms and biases stay f32, as llama.cpp's converter does.
            out = data if data.ndim == 1 else data.astype(dtype)
            writer.add_tensor(gguf_name, out)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    return dest


def _add_vocab(gguf: Any, writer: Any, folder: Path, n_vocab: int, pre: str) -> None:
    """A GPT-2-style BPE vocabulary, typed as llama.cpp's converter types it: added special
    tokens are CONTROL, other added tokens USER_DEFINED, ids beyond the tokenizer UNUSED."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    added = tok.get_added_tokens_decoder()
    if max(by_id) >= n_vocab:
        raise ExportError(f"The tokenizer has ids up to {max(by_id)} but vocab_size is {n_vocab}.")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    special.add_to_gguf(writer)


def _convert_with_script(
    script: Path, folder: Path, dest: Path, outtype: str, overwrite: bool
) -> Path:
    if not script.is_file():
        raise InvalidInputError(f"The converter script {script} does not exist.")
    with atomic_output(dest, overwrite) as tmp:
        done = subprocess.run(
            [sys.executable, str(script), str(folder), "--outfile", str(tmp), "--outtype", outtype],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise ExportError(f"llama.cpp's converter failed: {done.stderr.strip()[-500:]}")
    return dest


# --- GGUF -> quantized GGUF -------------------------------------------------------------------


def gguf_file_type(path: Path) -> str:
    gguf = _need("gguf", "Reading GGUF")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises bare ValueError/struct errors on junk
        raise BundleError(f"{path} is not a readable GGUF file ({exc}).", file=str(path)) from exc
    field = reader.fields.get("general.file_type")
    if field is None:
        return "UNKNOWN"
    try:
        return gguf.LlamaFileType(field.contents()).name
    except ValueError:
        return f"TYPE_{field.contents()}"


def quantize(
    source: str | Path,
    dest: str | Path,
    qtype: str,
    *,
    force: bool = False,
    overwrite: bool = False,
    threads: int = 0,
) -> Path:
    """Quantize a GGUF file with llama.cpp to `qtype` (e.g. Q8_0, Q4_K_M)."""
    import llama_cpp

    source, dest = Path(source), Path(dest)
    name = f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}"
    ftype = getattr(llama_cpp, name, None)
    if ftype is None:
        known = sorted(k.removeprefix("LLAMA_FTYPE_MOSTLY_") for k in dir(llama_cpp)
                       if k.startswith("LLAMA_FTYPE_MOSTLY_"))  # fmt: skip
        raise InvalidInputError(f"Unknown quantization {qtype!r}; known: {', '.join(known)}.")
    src_type = gguf_file_type(source)
    if src_type not in HIGH_PRECISION and not force:
        raise InvalidInputError(
            f"{source.name} is already quantized ({src_type}); quantizing it again compounds "
            "the error. Start from an f32/f16/bf16/Q8_0 file, or pass --force to do it anyway."
        )
    with atomic_output(dest, overwrite) as tmp:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = threads
        params.allow_requantize = force
        with quiet_stderr():
            code = llama_cpp.llama_model_quantize(
                str(source).encode(), str(tmp).encode(), ctypes.byref(params)
            )
        if code != 0:
            raise ExportError(
                f"llama.cpp failed to quantize {source.name} to {qtype} (code {code})."
            )
    return dest


# --- parity -----------------------------------------------------------------------------------


@dataclass
class Parity:
    top1_agreement: float
    mean_kl: float
    max_abs_logit_diff: float
    perplexity_gguf: float
    perplexity_source: float
    positions: int
    tokenizer_match: bool
    file_size: int
    load_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _perplexity(logits: np.ndarray, ids: list[int]) -> float:
    lp = _log_softmax(logits[:-1].astype(np.float64))
    nll = -lp[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


def llama_cpp_logits(path: Path, prompts: list[list[int]]) -> tuple[list[np.ndarray], float]:
    """All-position logits of each prompt under llama.cpp, and the model load time."""
    import llama_cpp

    started = time.perf_counter()
    with quiet_stderr():
        llama = llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, verbose=False)
    load = time.perf_counter() - started
    out = []
    for ids in prompts:
        llama.reset()
        llama.eval(ids)
        out.append(np.array(llama.scores[: len(ids)], dtype=np.float32))
    return out, load


def parity_report(
    gguf_path: str | Path, source: str | Path, prompts: list[str] | None = None
) -> Parity:
    """Compare the GGUF under llama.cpp with the fp32 Hugging Face source under transformers."""
    torch = _need("torch", "The parity report")
    transformers = _need("transformers", "The parity report")
    from tokenizers import Tokenizer

    gguf_path, source = Path(gguf_path), Path(source)
    prompts = prompts or PARITY_PROMPTS
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    hf_ids = [
        tokenizer.encode(p, add_special_tokens=False).ids for p in [*prompts, PERPLEXITY_TEXT]
    ]

    import llama_cpp

    with quiet_stderr():
        vocab_only = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    cpp_ids = [vocab_only.tokenize(p.encode(), add_bos=False, special=False)
               for p in [*prompts, PERPLEXITY_TEXT]]  # fmt: skip
    del vocab_only
    cpp_logits, load = llama_cpp_logits(gguf_path, hf_ids)

    model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    model.eval()
    agree = total = 0
    kls, max_diff = [], 0.0
    ref_logits = []
    with torch.no_grad():
        for ids, cpp in zip(hf_ids, cpp_logits, strict=True):
            ref = model(torch.tensor([ids])).logits[0].numpy()
            ref_logits.append(ref)
            n = min(ref.shape[1], cpp.shape[1])
            ref, cpp = ref[:, :n], cpp[:, :n]
            agree += int((ref.argmax(-1) == cpp.argmax(-1)).sum())
            total += len(ids)
            p, q = _log_softmax(ref.astype(np.float64)), _log_softmax(cpp.astype(np.float64))
            kls.extend((np.exp(p) * (p - q)).sum(-1).tolist())
            max_diff = max(max_diff, float(np.abs(ref - cpp).max()))
    return Parity(
        top1_agreement=agree / total,
        mean_kl=float(np.mean(kls)),
        max_abs_logit_diff=max_diff,
        perplexity_gguf=_perplexity(cpp_logits[-1], hf_ids[-1]),
        perplexity_source=_perplexity(ref_logits[-1], hf_ids[-1]),
        positions=total,
        tokenizer_match=hf_ids == cpp_ids,
        file_size=gguf_path.stat().st_size,
        load_seconds=load,
    )


def write_report(path: Path, report: dict[str, Any]) -> Path:
    out = path.with_name(path.name + ".parity.json")
    atomic_write(out, json.dumps(report, indent=2))
    return out


# --- GGUF -> HF (to start from a GGUF) --------------------------------------------------------


def gguf_to_hf(gguf_path: str | Path, dest: str | Path) -> Path:
    """Dequantize a GGUF into an fp32 Hugging Face folder with transformers (needs accelerate)."""
    transformers = _need("transformers", "Reading a GGUF into transformers")
    torch = _need("torch", "Reading a GGUF into transformers")
    gguf_path, dest = Path(gguf_path), Path(dest)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )
    private_dir(dest)
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))
    _repair_special_tokens(gguf_path, dest)
    return dest


def _repair_special_tokens(gguf_path: Path, folder: Path) -> None:
    """transformers' GGUF tokenizer loader gets BOS/EOS and add_bos wrong for some models
    (SmolLM2: EOS becomes <|im_start|> and a BOS is added): restore them from the GGUF."""
    gguf = _need("gguf", "Reading GGUF")
    fields = gguf.GGUFReader(str(gguf_path)).fields

    def get(key: str) -> Any:
        f = fields.get(key)
        return None if f is None else f.contents()

    tokens = get("tokenizer.ggml.tokens") or []
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for role in ("bos", "eos", "padding"):
        token_id = get(f"tokenizer.ggml.{role}_token_id")
        if token_id is not None and token_id < len(tokens):
            key = "pad" if role == "padding" else role
            cfg[f"{key}_token"] = tokens[token_id]
            cfg.pop(f"{key}_token_id", None)
    add_bos = get("tokenizer.ggml.add_bos_token")
    if add_bos is not None:
        cfg["add_bos_token"] = bool(add_bos)
    atomic_write(cfg_path, json.dumps(cfg, indent=2, ensure_ascii=False))
    (folder / "special_tokens_map.json").unlink(missing_ok=True)
    if add_bos is False:
        tok_path = folder / "tokenizer.json"
        tok = json.loads(tok_path.read_text())
        tok["post_processor"] = None
        atomic_write(tok_path, json.dumps(tok, ensure_ascii=False))


def export_llm(
    source: str | Path,
    out_dir: str | Path,
    quants: list[str],
    *,
    force: bool = False,
    overwrite: bool = False,
    report: bool = True,
    script: str | Path | None = None,
) -> dict[str, Any]:
    """The whole LLM path, with a parity report beside every output; returns {file: report}.

    - HF folder: convert to f16 GGUF, then quantize to each type.
    - GGUF of f32/f16/bf16/Q8_0: quantize it directly (the reports dequantize it into
      transformers as the reference).
    - low-bit GGUF: refused unless `force`; then dequantized (transformers), converted to
      f16 and quantized from there, so the reports measure against that dequantized source.
    """
    source, out_dir = Path(source), Path(out_dir)
    if not source.exists():
        raise InvalidInputError(f"{source} does not exist.")
    private_dir(out_dir)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix=".hf-", dir=out_dir) as tmp:
        hf: Path | None = None
        outputs: list[Path] = []
        if source.is_dir():
            hf = source
            base = convert_hf(
                hf, out_dir / f"{source.name}.f16.gguf", overwrite=overwrite, script=script
            )
            outputs.append(base)
        else:
            src_type = gguf_file_type(source)
            low_bit = src_type not in HIGH_PRECISION
            if low_bit and not force:
                raise InvalidInputError(
                    f"{source.name} is already quantized ({src_type}); re-exporting it compounds "
                    "the error. Start from an f32/f16/bf16/Q8_0 file or an HF folder, or pass "
                    "--force to dequantize it and go on."
                )
            if low_bit or report:
                hf = gguf_to_hf(source, Path(tmp) / source.stem)
            if low_bit:
                base = convert_hf(hf, out_dir / f"{source.stem}.f16.gguf", overwrite=overwrite)  # type: ignore[arg-type]
                outputs.append(base)
            else:
                base = source
        stem = base.name.removesuffix(".gguf")
        for q in quants:
            outputs.append(quantize(base, out_dir / f"{stem}.{q}.gguf", q, overwrite=overwrite))
        for path in outputs:
            if report and hf is not None:
                parity = parity_report(path, hf).as_dict()
                write_report(path, parity)
                results[path.name] = parity
            else:
                results[path.name] = {"file_size": path.stat().st_size}
    return results
