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


def split_head(
    onnx_path: str | Path,
    aggregate_path: str | Path,
    project_path: str | Path,
    layout_heads_first: bool = True,
):
    """Write the `aggregate` graph (the head's request inputs, history, projected, mask ->
    soft_tokens) and the `project` graph (history (B, N, d_enc) -> projected
    (B, n_persona, N, d_llm), see `heads_first`) of the single-graph head at `onnx_path`.
    Without `layout_heads_first`, projected is (B, N, n_persona·d_llm), as heads split
    before the rewrite have it (the device runs both)."""
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
    if layout_heads_first:
        heads_first(aggregate, project)
    for part, path in ((aggregate, aggregate_path), (project, project_path)):
        with replacing(path) as written:
            onnx.save(part, str(written))


WEIGHTED_SUM_NODE = "/Einsum_1"  # Σ_i softmax_i · Proj(h_i), as the exporter writes it
WEIGHTED_SUM_EQUATION = b"bkn,bnkd->bkd"


def heads_first(aggregate, project) -> bool:
    """Rewrite a split head's two graphs (ModelProtos, in place) so that the projections
    are kept heads first, (B, k, N, d_llm), and the weighted sum is one batched MatMul.

    The exporter keeps them item first, (B, N, k·d_llm), and sums with an Einsum that
    onnxruntime computes by transposing every projection at every request: 1.5 of the
    head's 2.0 ms on 512 items (onnxruntime's profiler, 2 cores). Now the project graph
    transposes once, when a history's projections are made, and a request multiplies the
    (B, k, 1, N) weights by them. The same products; the sums over N in MatMul's order.
    False (graphs unchanged) for a head of another shape or one already rewritten."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    originals = (aggregate, project)
    aggregate, project = onnx.ModelProto(), onnx.ModelProto()  # rewritten on copies
    aggregate.CopyFrom(originals[0])
    project.CopyFrom(originals[1])
    agg, proj = aggregate.graph, project.graph
    einsum = next((n for n in agg.node if n.name == WEIGHTED_SUM_NODE), None)
    if einsum is None or einsum.op_type != "Einsum":
        return False
    equation = next((a.s for a in einsum.attribute if a.name == "equation"), b"")
    producers = {out: n for n in agg.node for out in n.output}
    reshape = producers.get(einsum.input[1])
    if equation.replace(b" ", b"") != WEIGHTED_SUM_EQUATION or reshape is None:
        return False
    if reshape.op_type != "Reshape" or reshape.input[0] != PROJECTED:
        return False
    # The Reshape's shape is (B, N) from the input's shape, then the constant (k, d_llm).
    concat = producers.get(reshape.input[1])
    consts = [producers.get(name) for name in (concat.input if concat else [])]
    pairs = [
        numpy_helper.to_array(c.attribute[0].t)
        for c in consts
        if c is not None and c.op_type == "Constant" and c.attribute[0].t.dims == [2]
    ]
    if concat is None or concat.op_type != "Concat" or len(pairs) != 1:
        return False
    k, d_llm = (int(v) for v in pairs[0])

    # project: (B, N, k·d) -> Reshape (B, N, k, d) -> Transpose (B, k, N, d)
    last = next(n for n in proj.node if PROJECTED in n.output)
    flat = PROJECTED + "_item_first"
    last.output[:] = [flat if o == PROJECTED else o for o in last.output]
    shape = numpy_helper.from_array(np.array([0, 0, k, d_llm], np.int64), "heads_first_shape")
    proj.initializer.append(shape)
    proj.node.extend(
        [
            helper.make_node(
                "Reshape", [flat, shape.name], [flat + "_4d"], name="/heads_first/Reshape"
            ),
            helper.make_node(
                "Transpose", [flat + "_4d"], [PROJECTED], perm=[0, 2, 1, 3],
                name="/heads_first/Transpose",
            ),
        ]
    )  # fmt: skip
    layout = ["batch", k, "n", d_llm]
    for values in (proj.output, agg.input):
        for i, value in enumerate(values):
            if value.name == PROJECTED:
                values[i].CopyFrom(
                    helper.make_tensor_value_info(PROJECTED, onnx.TensorProto.FLOAT, layout)
                )

    # aggregate: softmax (B, k, N) -> (B, k, 1, N) @ projected (B, k, N, d) -> (B, k, d)
    axis = numpy_helper.from_array(np.array([2], np.int64), "heads_first_axis")
    agg.initializer.append(axis)
    weights, summed = einsum.input[0], einsum.output[0]
    replacement = [
        helper.make_node("Unsqueeze", [weights, axis.name], [weights + "_row"],
                         name="/heads_first/Unsqueeze"),
        helper.make_node("MatMul", [weights + "_row", PROJECTED], [summed + "_row"],
                         name="/heads_first/MatMul"),
        helper.make_node("Squeeze", [summed + "_row", axis.name], [summed],
                         name="/heads_first/Squeeze"),
    ]  # fmt: skip
    nodes = list(agg.node)
    at = nodes.index(einsum)
    nodes[at : at + 1] = replacement
    del agg.node[:]
    agg.node.extend(_live(nodes, {o.name for o in agg.output}))
    del agg.value_info[:]  # shapes of the removed chain; onnxruntime infers the rest
    del proj.value_info[:]
    readers = [n.name for n in agg.node if PROJECTED in n.input]
    if readers != ["/heads_first/MatMul"]:
        return False  # something else read the item-first projections: not this head's shape
    for model, original in zip((aggregate, project), originals, strict=True):
        onnx.checker.check_model(model)
        original.CopyFrom(model)
    return True


def _live(nodes: list, outputs: set[str]) -> list:
    """`nodes` without those whose outputs nothing reads (the old Reshape's shape chain)."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    return kept[::-1]


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
