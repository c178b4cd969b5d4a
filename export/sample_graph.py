"""``sample.onnx``: cached decoding as one ONNX graph, uniforms in, uint8 images out.

Composed from the bundle's own, already verified ``row`` and ``step`` graphs (their nodes are copied, with
prefixed names, into the bodies of two nested ``Loop`` nodes), so it computes exactly what the runtime's
cached decoding loop (runtime/decoding.py) computes from the same files:

    images = zeros; caches = zeros; prev = zeros
    for i in 0..H-1:                               # outer Loop, one row
        caches = row(prev, has_prev = i > 0, caches)
        x_row = prefix row i if i < start_row else zeros
        for t in 0..W*C-1:                         # inner Loop, one sub-pixel: j = t div C, k = t mod C
            log_probs, caches = step(x_row, j, caches)
            if i >= start_row: x_row[k, j] = inverse_cdf(log_probs[k], uniforms[i, j, k])
        prev = x_row; emit x_row

Rows above ``start_row`` are kept from ``prefix`` (image completion; start_row 0 samples whole images). The
sampling rule is the runtime's: float64 CDF of exp(log_probs - max), level = #{bins l < K-1 : cdf[l] <= u *
cdf[K-1]}. A step called again at the same column with the same row rewrites the same cache entries, so
stepping a kept row once per channel leaves the caches as the runtime's single step does.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SAMPLE_GRAPH = "sample"


def _const(name: str, value: Any, dtype: Any = np.int64) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype=dtype)))


def _inline(graph: onnx.GraphProto, prefix: str, inputs: dict[str, str]) -> tuple[list[onnx.NodeProto], dict[str, str]]:
    """The graph's nodes with every value renamed ``prefix + name``, except its inputs, which become the
    values ``inputs`` maps them to; returns (nodes, map from the graph's output names to the new names)."""
    names = {i.name: inputs[i.name] for i in graph.input if i.name in inputs}
    missing = [i.name for i in graph.input if i.name not in names and i.name not in {t.name for t in graph.initializer}]
    if missing:
        raise ValueError(f"no value for the graph input(s) {missing}")

    def rename(n: str) -> str:
        return names.get(n, prefix + n) if n else n

    nodes = []
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"cannot inline node {node.name!r}: it holds a subgraph")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = prefix + node.name
        del copy.input[:]
        del copy.output[:]
        copy.input.extend(rename(n) for n in node.input)
        copy.output.extend(rename(n) for n in node.output)
        nodes.append(copy)
    return nodes, {o.name: rename(o.name) for o in graph.output}


def _initializers(graph: onnx.GraphProto, prefix: str) -> list[onnx.TensorProto]:
    out = []
    for t in graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        copy.name = prefix + t.name
        out.append(copy)
    return out


def build_sample_graph(
    row: onnx.ModelProto, step: onnx.ModelProto, *, caches: list[tuple[str, tuple[int, ...]]],
    height: int, width: int, channels: int, levels: int, conditional: bool,
) -> onnx.ModelProto:
    """The sampling graph of a bundle whose ``row`` and ``step`` ONNX graphs are ``row`` and ``step``.

    ``caches``: (name without the ``cache_``/``new_`` prefix, shape without batch) in the step's order.
    Inputs: uniforms float64 (batch, H, W, C), prefix uint8 (batch, H, W, C), start_row int64 (1,)[, labels
    int64 (batch,)]; output: images uint8 (batch, H, W, C).
    """
    opset = next(o.version for o in step.opset_import if o.domain in ("", "ai.onnx"))
    names = [n for n, _ in caches]
    hw_c = [height, width, channels]
    f32, f64, i64 = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64

    # ---- the inner loop body: one sub-pixel --------------------------------------------------------------
    step_map = {"x_row": "s_xrow", "j": "s_j1", **{f"cache_{n}": f"s_cache_{n}" for n in names}}
    if conditional:
        step_map["labels"] = "labels"
    step_nodes, step_out = _inline(step.graph, "step/", step_map)
    if opset >= 18:
        reduce_max = [_const("s_axis_last", [-1]), helper.make_node("ReduceMax", ["s_lp64", "s_axis_last"], ["s_max"])]
    else:
        reduce_max = [helper.make_node("ReduceMax", ["s_lp64"], ["s_max"], axes=[-1])]
    s_nodes = [
        _const("s_C", channels), _const("s_W", width), _const("s_shape1", [1]), _const("s_axis1", [1]),
        _const("s_zero1", [0]), _const("s_kminus1", [levels - 1]), _const("s_flat", [0, -1]),
        helper.make_node("Div", ["t", "s_C"], ["s_j"]),
        helper.make_node("Mod", ["t", "s_C"], ["s_k"]),
        helper.make_node("Reshape", ["s_j", "s_shape1"], ["s_j1"]),
        *step_nodes,
        # The sampling rule, in float64 as the runtime's inverse_cdf.
        helper.make_node("Gather", [step_out["log_probs"], "s_k"], ["s_lp"], axis=1),  # (B, K)
        helper.make_node("Cast", ["s_lp"], ["s_lp64"], to=f64),
        *reduce_max,
        helper.make_node("Sub", ["s_lp64", "s_max"], ["s_shifted"]),
        helper.make_node("Exp", ["s_shifted"], ["s_p"]),
        _const("s_axis_cum", 1), _const("s_K", [levels]),
        helper.make_node("CumSum", ["s_p", "s_axis_cum"], ["s_cdf"]),
        helper.make_node("Slice", ["s_cdf", "s_kminus1", "s_K", "s_axis1"], ["s_total"]),  # (B, 1)
        helper.make_node("Gather", ["r_u", "t"], ["s_u"], axis=1),  # (B,)
        helper.make_node("Unsqueeze", ["s_u", "s_axis1"], ["s_u1"]),
        helper.make_node("Mul", ["s_u1", "s_total"], ["s_target"]),
        helper.make_node("Slice", ["s_cdf", "s_zero1", "s_kminus1", "s_axis1"], ["s_head"]),  # (B, K-1)
        helper.make_node("LessOrEqual", ["s_head", "s_target"], ["s_below"]),
        helper.make_node("Cast", ["s_below"], ["s_below_i"], to=i64),
        helper.make_node("ReduceSum", ["s_below_i", "s_axis1"], ["s_level"], keepdims=1),  # (B, 1)
        helper.make_node("Cast", ["s_level"], ["s_level_f"], to=f32),
        # x_row[:, k, j] = level where the row is sampled, else unchanged.
        helper.make_node("Mul", ["s_k", "s_W"], ["s_kw"]),
        helper.make_node("Add", ["s_kw", "s_j"], ["s_pos"]),
        helper.make_node("Reshape", ["s_pos", "s_shape1"], ["s_pos1"]),
        helper.make_node("Unsqueeze", ["s_pos1", "s_zero1"], ["s_pos11"]),  # (1, 1)
        helper.make_node("Expand", ["s_pos11", "batch_1"], ["s_index"]),  # (B, 1)
        helper.make_node("Reshape", ["s_xrow", "s_flat"], ["s_xflat"]),  # (B, C * W)
        helper.make_node("GatherElements", ["s_xflat", "s_index"], ["s_old"], axis=1),
        helper.make_node("Where", ["r_sampled", "s_level_f", "s_old"], ["s_value"]),
        helper.make_node("ScatterElements", ["s_xflat", "s_index", "s_value"], ["s_xflat_new"], axis=1),
        helper.make_node("Shape", ["s_xrow"], ["s_xshape"]),
        helper.make_node("Reshape", ["s_xflat_new", "s_xshape"], ["s_xrow_next"]),
        helper.make_node("Identity", ["s_cond"], ["s_cond_out"]),
    ]
    s_out = ["s_cond_out", "s_xrow_next", *[step_out[f"new_{n}"] for n in names]]
    step_body = helper.make_graph(
        s_nodes, "sub_pixel",
        [helper.make_tensor_value_info("t", i64, []), helper.make_tensor_value_info("s_cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_xrow", f32, None),
         *[helper.make_tensor_value_info(f"s_cache_{n}", f32, None) for n in names]],
        [helper.make_tensor_value_info(s_out[0], TensorProto.BOOL, []),
         *[helper.make_tensor_value_info(o, f32, None) for o in s_out[1:]]],
    )

    # ---- the outer loop body: one row --------------------------------------------------------------------
    row_map = {"x_prev_row": "r_prev", "has_prev": "r_has_prev", **{f"cache_{n}": f"r_cache_{n}" for n in names}}
    if conditional:
        row_map["labels"] = "labels"
    row_nodes, row_out = _inline(row.graph, "row/", row_map)
    r_nodes = [
        _const("r_zero", 0), _const("r_shape1", [1]), _const("r_flat", [0, -1]), _const("r_steps", width * channels),
        helper.make_node("Greater", ["i", "r_zero"], ["r_after_first"]),
        helper.make_node("Cast", ["r_after_first"], ["r_has_prev0"], to=f32),
        helper.make_node("Reshape", ["r_has_prev0", "r_shape1"], ["r_has_prev"]),
        *row_nodes,
        helper.make_node("Less", ["i", "start"], ["r_kept"]),
        helper.make_node("Not", ["r_kept"], ["r_sampled"]),
        helper.make_node("Cast", ["r_kept"], ["r_kept_f"], to=f32),
        helper.make_node("Gather", ["x_prefix", "i"], ["r_prefix_row"], axis=2),  # (B, C, W)
        helper.make_node("Mul", ["r_prefix_row", "r_kept_f"], ["r_xrow0"]),
        helper.make_node("Gather", ["uniforms", "i"], ["r_u_hwc"], axis=1),  # (B, W, C)
        helper.make_node("Reshape", ["r_u_hwc", "r_flat"], ["r_u"]),  # (B, W * C): t = j * C + k
        helper.make_node(
            "Loop", ["r_steps", "", "r_xrow0", *[row_out[f"new_{n}"] for n in names]],
            ["r_xrow", *[f"r_next_{n}" for n in names]], body=step_body,
        ),
        helper.make_node("Identity", ["r_cond"], ["r_cond_out"]),
        helper.make_node("Identity", ["r_xrow"], ["r_emit"]),
    ]
    row_body = helper.make_graph(
        r_nodes, "row",
        [helper.make_tensor_value_info("i", i64, []), helper.make_tensor_value_info("r_cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("r_prev", f32, None),
         *[helper.make_tensor_value_info(f"r_cache_{n}", f32, None) for n in names]],
        [helper.make_tensor_value_info("r_cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("r_xrow", f32, None),
         *[helper.make_tensor_value_info(f"r_next_{n}", f32, None) for n in names],
         helper.make_tensor_value_info("r_emit", f32, None)],
    )

    # ---- the main graph ----------------------------------------------------------------------------------
    nodes = [
        _const("height", height), _const("zero1", [0]), _const("one1", [1]), _const("row_shape", [channels, width]),
        helper.make_node("Shape", ["uniforms"], ["u_shape"]),
        helper.make_node("Slice", ["u_shape", "zero1", "one1"], ["batch"]),  # (1,): B
        helper.make_node("Concat", ["batch", "one1"], ["batch_1"], axis=0),  # (B, 1) for Expand
        helper.make_node("Squeeze", ["start_row", "zero1"], ["start"]),
        helper.make_node("Cast", ["prefix"], ["prefix_f"], to=f32),
        helper.make_node("Transpose", ["prefix_f"], ["x_prefix"], perm=[0, 3, 1, 2]),  # (B, C, H, W)
        helper.make_node("Concat", ["batch", "row_shape"], ["prev_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["prev_shape"], ["prev0"], value=numpy_helper.from_array(
            np.zeros(1, np.float32))),
    ]
    for n, shape in caches:
        nodes += [
            _const(f"shape_{n}", list(shape)),
            helper.make_node("Concat", ["batch", f"shape_{n}"], [f"full_shape_{n}"], axis=0),
            helper.make_node("ConstantOfShape", [f"full_shape_{n}"], [f"init_{n}"],
                             value=numpy_helper.from_array(np.zeros(1, np.float32))),
        ]
    nodes += [
        helper.make_node("Loop", ["height", "", "prev0", *[f"init_{n}" for n in names]],
                         ["last_row", *[f"final_{n}" for n in names], "rows"], body=row_body),  # rows (H, B, C, W)
        helper.make_node("Transpose", ["rows"], ["images_f"], perm=[1, 0, 3, 2]),  # (B, H, W, C)
        helper.make_node("Cast", ["images_f"], ["images"], to=TensorProto.UINT8),
    ]
    inputs = [
        helper.make_tensor_value_info("uniforms", f64, ["batch", *hw_c]),
        helper.make_tensor_value_info("prefix", TensorProto.UINT8, ["batch", *hw_c]),
        helper.make_tensor_value_info("start_row", i64, [1]),
    ]
    if conditional:
        inputs.append(helper.make_tensor_value_info("labels", i64, ["batch"]))
    graph = helper.make_graph(
        nodes, "genforge_sample", inputs,
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", *hw_c])],
        initializer=[*_initializers(row.graph, "row/"), *_initializers(step.graph, "step/")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="genforge", ir_version=step.ir_version)
    onnx.checker.check_model(model, full_check=True)
    return model


def verify_sample_graph(bundle_dir: Path, *, batch: int = 3, seed: int | None = None) -> dict[str, Any]:
    """Run ``sample.onnx`` against the runtime's cached decoding on the bundle's own step graphs, for fresh
    uniforms (and labels), sampling whole images and completing the bottom half of others: the number of
    sub-pixels where the two differ (the export fails unless it is 0)."""
    from genforge.runtime import load
    from genforge.runtime.decoding import cached_decode

    seed = secrets.randbits(31) if seed is None else seed
    sampler = load(bundle_dir, backend="onnx", device="cpu")
    h, w, c = sampler.image_shape
    rng = np.random.default_rng(seed)
    u = rng.random((batch, h, w, c))
    labels = rng.integers(0, sampler.num_classes, batch) if sampler.num_classes else None
    prefix = rng.integers(0, sampler.levels, (batch, h, w, c)).astype(np.uint8)
    mismatched = 0
    for start_row in (0, h // 2):
        want = cached_decode(sampler.backend.stepper(), u, labels=labels, levels=sampler.levels,
                             prefix=prefix, start_row=start_row)
        feed = {"uniforms": u, "prefix": prefix, "start_row": np.array([start_row], dtype=np.int64)}
        if labels is not None:
            feed["labels"] = labels.astype(np.int64)
        got = sampler.backend.run(SAMPLE_GRAPH, feed)[0]
        mismatched += int((got != want).sum())
    return {"compared_with": "cached", "mismatched_subpixels": mismatched, "batch": batch, "seed": seed,
            "start_rows": [0, h // 2]}
