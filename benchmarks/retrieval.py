"""Ingest (ONNX int8 embedder vs sentence-transformers fp32) and KNN search (sqlite-vec vs
a numpy brute force) on the same data in the same run."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from edge_pllm.embedder import Embedder
from edge_pllm.store import HistoryStore
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
    reference.encode(texts[:32], batch_size=32)  # warm up
    embedder.embed(texts[:32])
    # Interleaved in chunks, so that a busy spell on the machine hits every engine alike.
    engines = {
        "st": lambda chunk: reference.encode(chunk, batch_size=32, normalize_embeddings=True),
        "ours": embedder.embed,  # as the runtime ingests: one text per run (see embedder.py)
        "batched": lambda chunk: embedder.embed(chunk, batch_size=32),
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
    st_rate, ours_rate, batched_rate = (len(texts) / seconds[name] for name in engines)
    st, ours = np.concatenate(vectors["st"]), np.concatenate(vectors["ours"])

    cos = np.sum(ours * st, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(st, axis=1))
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
    res.add(Row("ingest", "ONNX int8, batch 32", batched_rate, "items/s", ref, st_rate, "≥ 3 ×"))
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
    """Latency of the user's k nearest items, sqlite-vec vs numpy over the same vectors."""
    print("knn search vs history size", flush=True)
    table: dict[int, dict[str, float]] = {}
    for n, user in sorted(users.items()):
        ids, matrix = store.vectors(user, limit=None)
        id_arr = np.asarray(ids)

        def brute(q: np.ndarray, matrix=matrix, id_arr=id_arr) -> set[int]:
            scores = matrix @ q
            top = np.argpartition(-scores, min(k, len(scores) - 1))[:k]
            return set(id_arr[top].tolist())

        agree = np.mean(
            [
                len({h.item.id for h in store.search(user, q, k)} & brute(q)) / min(k, n)
                for q in queries
            ]
        )
        sv = median_time(lambda u=user: [store.search(u, q, k) for q in queries], 3) / len(queries)
        nb = median_time(lambda b=brute: [b(q) for q in queries], 3) / len(queries)
        table[n] = {"sqlite-vec": sv * 1000, "numpy": nb * 1000, "agreement": float(agree)}
        res.add(
            Row(
                "knn",
                f"sqlite-vec k={k} at {n:,} items (top-{k} agreement {agree:.2f})",
                sv * 1000,
                "ms",
                "numpy brute force",
                nb * 1000,
            )
        )
    res.series["knn"] = table
