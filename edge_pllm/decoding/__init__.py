"""Decoding: how an answer is drawn from the prompts personalization prepared.

decoders   a strategy spec resolved into a plan: prompts to prepare and a decoder; the
           decoders and strategies of other packages (`load_plugins`)
drawer     `Prepared` and `Drawer`: a prepared prompt into text, for every decoder
consensus  several sampled answers, the one the others agree with most
beam       beam search over token ids
answers    where a generated answer ends and what of it counts
"""

import importlib as _importlib
from typing import Any as _Any

# The decoders' registry by the package's name (`edge_pllm.decoding.register_decoder`), as
# plugins have written it since the strategies entry point existed; loaded on first use.
_DECODERS = (
    "Decoder", "Direct", "Drawer", "Drawn", "Plan", "Prepared", "PLUGINS_GROUP",
    "load_plugins", "names", "register_decoder", "resolve",
)  # fmt: skip


def __getattr__(name: str) -> _Any:
    if name in _DECODERS:
        return getattr(_importlib.import_module(".decoders", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
