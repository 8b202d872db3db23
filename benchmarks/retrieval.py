"""Ingest (ONNX int8 embedder vs sentence-transformers fp32) and KNN search (sqlite-vec vs
a numpy brute force) on the same data in the same run."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from edge_pllm.inference.embedder import Embedder
from edge_pllm.storage.store import HistoryStore
from export.defaults import default_embedder_source

from .common import Results, Row, median_time, synthetic_history


def ingest(res: Results, embedder: Embedder, texts: list[str], threads: int) -> np.ndarray:
    """Embedding throughput and agreement; returns the runtime's vectors of `texts`."""
    import torch
    from sentence_transformers import SentenceTransformer

    print(f"ingest: {len(texts)} commit bodies", flush=True)
    torch.set_num_threads(threads)
    reference = SentenceTransformer(str(default_embedder_source()), device="cpu")
    reference.max_seq_length = embedder.config.max_seq_length
    # A batch-invariant export of the same encoder (not shipped: the head was trained on
    # the shipped model's vectors), made here; the embedder opens its worker session lazily,
    # so the folder lives until the end.
    from export.embedder import export_embedder

    scratch = tempfile.TemporaryDirectory(prefix="edge-pllm-per-row-")
    made = export_embedder(default_embedder_source(), scratch.name, "per-row")
    per_row = Embedder(made.onnx_int8, made.tokenizer, made.config)
    reference.encode(texts[:32], batch_size=32)  # warm up
    embedder.embed(texts[:32])
    per_row.embed(texts[:32])
    # Interleaved in chunks, so that a busy spell on the machine hits every engine alike.
    engines = {
        "st": lambda chunk: reference.encode(chunk, batch_size=32, normalize_embeddings=True),
        # as the runtime ingests: one text per run (see edge_pllm/inference/embedder.py)
        "ours": embedder.embed,
        "batched": lambda chunk: embedder.embed(chunk, batch_size=32),
        "per-row": per_row.embed,  # batches as its manifest entry says
    }
    seconds = dict.fromkeys(engines, 0.0)
    vectors: dict[str, list[np.ndarray]] = {name: [] for name in engines}
    step = max(1, len(texts) // 5)
    for start in range(0, len(texts), step):
        chunk = texts[start : start + step]
        for name, embed in engines.items():
            began = time.perf_counter()
            vectors[name].append(np.asarray(embed(chunk)))
            seconds[name] += time.perf_counter() - began
    st_rate, ours_rate, batched_rate, per_row_rate = (len(texts) / seconds[n] for n in engines)
    st, ours = np.concatenate(vectors["st"]), np.concatenate(vectors["ours"])
    batched, per_row_vecs = np.concatenate(vectors["batched"]), np.concatenate(vectors["per-row"])
    alone = np.stack([per_row.embed_one(t) for t in texts[:200]])
    invariance = np.abs(alone - per_row_vecs[:200]).max(axis=1)
    shipped_drift = float(np.abs(batched - ours).max())

    def cosine(vecs: np.ndarray) -> np.ndarray:
        return np.sum(vecs * st, axis=1) / (
            np.linalg.norm(vecs, axis=1) * np.linalg.norm(st, axis=1)
        )

    cos, per_row_cos = cosine(ours), cosine(per_row_vecs)
    res.add(Row("ingest", "sentence-transformers fp32 (PyTorch, batch 32)", st_rate, "items/s"))
    ref = "sentence-transformers fp32"
    res.add(
        Row(
            "ingest",
            "ONNX int8, one text per run (the runtime's ingest)",
            ours_rate,
            "items/s",
            ref,
            st_rate,
            "≥ 3 ×",
            ours_rate >= 3 * st_rate,
        )
    )
    res.add(
        Row(
            "ingest",
            "ONNX int8, batches of ≤ 32 (≤ 256 tokens; vectors depend on the batch)",
            batched_rate,
            "items/s",
            ref,
            st_rate,
            "≥ 3 ×",
        )
    )
    res.add(
        Row(
            "ingest",
            f"cosine, int8 vs fp32 (mean; min {cos.min():.3f})",
            float(cos.mean()),
            "",
            target="≥ 0.99",
            met=bool(cos.mean() >= 0.99),
        )
    )
    res.add(
        Row(
            "ingest",
            f"ONNX int8 per-row, batch-invariant (export --quantization per-row, not shipped; "
            f"batches of ≤ {per_row.config.batch_size}, ≤ 256 tokens)",
            per_row_rate,
            "items/s",
            ref,
            st_rate,
            "≥ 5 ×",
            per_row_rate >= 5 * st_rate,
        )
    )
    res.add(
        Row(
            "ingest",
            f"cosine, per-row int8 vs fp32 (mean; min {per_row_cos.min():.3f})",
            float(per_row_cos.mean()),
            "",
            target="≥ 0.99",
            met=bool(per_row_cos.mean() >= 0.99),
        )
    )
    res.add(
        Row(
            "ingest",
            f"batch-invariant (max abs diff alone vs batch, per-row; bitwise equal "
            f"{int((invariance == 0).sum())}/{len(invariance)}; shipped int8: {shipped_drift:.3g})",
            float(invariance.max()),
            "",
            target="= 0",
            met=bool(invariance.max() == 0),
        )
    )
    scratch.cleanup()
    return ours


def store_insert(res: Results, dim: int, texts: list[str], vectors: np.ndarray, n: int) -> None:
    items, vecs = synthetic_history(texts, vectors, n, seed=1)
    with tempfile.TemporaryDirectory() as tmp, HistoryStore(Path(tmp) / "i.db", dim) as store:
        started = time.perf_counter()
        for start in range(0, n, 1000):
            store.add("u", items[start : start + 1000], vecs[start : start + 1000])
        rate = n / (time.perf_counter() - started)
    res.add(
        Row("ingest", f"store insert with vectors ({n:,} items, 1,000 a batch)", rate, "items/s")
    )


def knn(res: Results, store: HistoryStore, users: dict[int, str], queries: np.ndarray, k: int = 5):
    """Latency of the user's k nearest items: the runtime's search (the user's matrix in
    memory, or sqlite-vec above the cache budget: by default a quarter of the machine's
    memory) vs numpy over the same vectors; the first search of each size, which reads the
    matrix, on its own; the memory the search keeps against the vectors' own size."""
    print("knn search vs history size", flush=True)
    budget = f"{store.cache_budget / 2**20:.0f} MiB"
    table: dict[int, dict[str, float]] = {}
    for n, user in sorted(users.items()):
        ids, held = store.vectors(user, limit=None)
        matrix, id_arr = np.array(held), np.asarray(ids)
        del held

        def brute(q: np.ndarray, matrix=matrix, id_arr=id_arr) -> set[int]:
            scores = matrix @ q
            top = np.argpartition(-scores, min(k, len(scores) - 1))[:k]
            return set(id_arr[top].tolist())

        store.clear_cache()  # earlier steps searched these users: start cold
        started = time.perf_counter()
        store.search(user, queries[0], k)
        cold = (time.perf_counter() - started) * 1000
        mib = store.cached_bytes(user) / 2**20
        agree = np.mean(
            [
                len({h.item.id for h in store.search(user, q, k)} & brute(q)) / min(k, n)
                for q in queries
            ]
        )
        ours = median_time(lambda u=user: [store.search(u, q, k) for q in queries], 3)
        nb = median_time(lambda b=brute: [b(q) for q in queries], 3) / len(queries) * 1000
        ms = ours / len(queries) * 1000
        where = "in memory" if mib else f"sqlite-vec: over the {budget} cache"
        table[n] = {"search": ms, "numpy": nb, "first search": cold, "MiB": mib}
        table[n]["agreement"] = float(agree)
        at_target = n in (100_000, 1_000_000)
        res.add(
            Row(
                "knn",
                f"search k={k} at {n:,} items ({where}; top-{k} agreement {agree:.2f})",
                ms,
                "ms",
                "numpy brute force",
                nb,
                "≤ 2 × numpy, agreement 1.00" if at_target else "",
                bool(ms <= 2 * nb and agree == 1.0) if at_target else None,
            )
        )
        first = "reads the matrix" if mib else "sqlite-vec"
        res.add(Row("knn", f"first search at {n:,} items ({first})", cold, "ms"))
        own = matrix.nbytes / 2**20  # the vectors themselves, float32
        res.add(
            Row(
                "knn",
                f"vectors kept in memory at {n:,} items (budget {budget})",
                mib,
                "MiB",
                "the vectors themselves (float32)",
                own,
                "≤ 1.02 × the vectors (their ids beside them)" if at_target else "",
                bool(0 < mib <= 1.02 * own) if at_target else None,  # 0: not kept at all
            )
        )
        del matrix, id_arr
    res.series["knn"] = table
