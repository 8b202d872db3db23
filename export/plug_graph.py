"""Split an exported Persona-Plug head into the two graphs the device runs.

The head computes P = Σ_i softmax_i(h_i · x) · Proj(h_i). Proj(h_i) depends on the history
item only, not on the request, so the device computes it once per history (the `project`
graph) and keeps it with the user's cached vectors; each request then runs only the
`aggregate` graph (scores, softmax, weighted sum, task tokens, norm), which reads the
projections as an input. Same weights, same arithmetic: the split changes no soft token.
"""

from __future__ import annotations

from pathlib import Path

from edge_pllm.errors import BundleError
from edge_pllm.files import open_private, replacing
from edge_pllm.personalization.head import PROJECTED_INPUT as PROJECTED

PROJECTION_NODE = "/proj/proj.2/Add"  # the last op of PPlugHead.proj, named by its scope


def _rename(graph, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new


def split_head(onnx_path: str | Path, aggregate_path: str | Path, project_path: str | Path):
    """Write the `aggregate` graph (the head's request inputs, history, projected, mask ->
    soft_tokens) and the `project` graph (history (B, N, d_enc) -> projected
    (B, N, n_persona·d_llm)) of the single-graph head at `onnx_path`."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(onnx_path))
    node = next((n for n in model.graph.node if n.name == PROJECTION_NODE), None)
    if node is None:
        raise BundleError(
            f"{onnx_path} has no {PROJECTION_NODE} node: it is not a head exported by "
            "export.pplug.export_onnx; re-export it.",
            file=str(onnx_path),
        )
    projected = node.output[0]
    if projected not in {v.name for v in model.graph.value_info}:
        # Shape inference does not reach through every exporter's ops; the type is enough.
        model.graph.value_info.append(
            onnx.helper.make_tensor_value_info(
                projected, onnx.TensorProto.FLOAT, ["batch", "n", "n_persona_d_llm"]
            )
        )
    inputs = [i.name for i in model.graph.input]
    extractor = Extractor(model)
    project = extractor.extract_model(["history"], [projected])
    aggregate = extractor.extract_model([*inputs, projected], ["soft_tokens"])
    for part in (project, aggregate):
        _rename(part.graph, projected, PROJECTED)
        onnx.checker.check_model(part)
    for part, path in ((aggregate, aggregate_path), (project, project_path)):
        with replacing(path) as written:
            onnx.save(part, str(written))


POPULATION_INITIALIZER = "history_mean"  # μ of PPlugHead (export/pplug/model.py)


def write_population(project_path: str | Path, dest: str | Path) -> bool:
    """Save the head's population history, μ (the training users' mean history vector the
    head centres on), as a (1, d_enc) float32 .npy at `dest`: fed as a history, it gives
    the persona of an average user. False (nothing written) for a head without centring
    (μ absent or zero), whose persona of an empty history is not meaningful."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(project_path))
    found = [t for t in model.graph.initializer if t.name == POPULATION_INITIALIZER]
    if not found:
        return False
    mean = numpy_helper.to_array(found[0]).astype(np.float32).reshape(1, -1)
    if not np.any(mean):
        return False
    with open_private(dest, "wb") as fh:
        np.save(fh, mean, allow_pickle=False)
    return True
