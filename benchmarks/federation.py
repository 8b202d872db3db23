"""What secure aggregation costs a federated client: bytes sent a round and seconds, plain
FedAvg against SecAgg+ (`--secure-aggregation`), on the tests' tiny model: 3 simulated
clients holding one person each, 2 rounds of 2 steps; and how far the SecAgg+ head is
from FedAvg's.

    .venv/bin/python -m benchmarks.federation       # needs the [federated] extra
"""

from __future__ import annotations

import pickle
import tempfile
import time
import uuid
from pathlib import Path

from export import pplug
from export.bundle import build_bundle
from export.defaults import default_embedder_source
from export.llm import convert_hf
from export.pplug import federated
from tests.test_federated import SPEC, config, examples_of, write_people
from tests.tiny_models import make_tiny_llama


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        tiny = make_tiny_llama(root / "tiny", std=0.5)
        gguf = convert_hf(tiny, root / "tiny.gguf", outtype="f32", pre="gpt-2", progress=False)
        bundle = build_bundle(
            root / "bundle", llm_gguf=gguf, embedder_source=default_embedder_source(), report=False
        )
        task = write_people(root / "task", ("train",), ("git-1", "git-2", "vim-1"))
        heads = {}
        for name, secure in (("FedAvg", False), ("SecAgg+", True)):
            sent = root / f"sent-{name}"
            sent.mkdir()

            def spy(message, context, call_next, sent=sent):  # what leaves a client
                reply = call_next(message, context)
                (sent / uuid.uuid4().hex).write_bytes(pickle.dumps(reply.content))
                return reply

            fed = pplug.FederatedConfig(federated_sim=3, local_steps=2, secure_aggregation=secure)
            started = time.perf_counter()
            heads[name], _, _ = federated.simulate(
                bundle, examples_of(task), SPEC, root / name, config(tiny), fed, root, mods=[spy]
            )
            seconds = time.perf_counter() - started
            replies = list(sent.iterdir())
            total = sum(p.stat().st_size for p in replies)
            print(
                f"{name}: {total / 3 / 2 / 1e6:.2f} MB a client a round "
                f"({len(replies)} replies), {seconds:.1f} s for 2 rounds"
            )
        a, b = heads["FedAvg"].state_dict(), heads["SecAgg+"].state_dict()
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        print(f"SecAgg+ head vs FedAvg's: max abs difference {diff:.1e}")


if __name__ == "__main__":
    main()
