"""The export's graph rewrite (GELU reorder) is exact and lets ONNX Runtime fuse GELU.

Scores of the rewritten towers are checked against the PyTorch reference by the scoring and verify
tests; these tests pin the rewrite itself.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pickscore_export.onnx_export import reorder_erf_gelu


def _exporter_style_gelu(path) -> None:
    """y = x * (0.5 * (1 + erf(x / sqrt2))), the order torch.onnx (dynamo) emits."""
    consts = [numpy_helper.from_array(np.array(v, dtype=np.float32), name)
              for name, v in (("sqrt2", 2 ** 0.5), ("one", 1.0), ("half", 0.5))]
    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
        helper.make_node("Mul", ["half", "a"], ["h"]),
        helper.make_node("Mul", ["x", "h"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])], consts)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _run(path, level, x):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _optimized_ops(path, out) -> collections.Counter:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node)


def test_reorder_is_bitwise_exact_and_fusable(tmp_path):
    before, after = tmp_path / "before.onnx", tmp_path / "after.onnx"
    _exporter_style_gelu(before)
    _exporter_style_gelu(after)
    assert reorder_erf_gelu(after) == 1
    assert reorder_erf_gelu(after) == 0  # already in the fusable order: nothing left to do
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32) * 4
    unfused = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert np.array_equal(_run(before, unfused, x), _run(after, unfused, x))
    assert _optimized_ops(before, tmp_path / "opt.onnx")["Gelu"] == 0  # why the rewrite exists
    ops = _optimized_ops(after, tmp_path / "opt.onnx")
    assert ops["Gelu"] == 1 and ops["Erf"] == 0
    fused = _run(after, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, x)
    np.testing.assert_allclose(fused, _run(before, unfused, x), rtol=0, atol=1e-6)


def test_exported_towers_run_gelu_fused(tiny_artifacts, tmp_path):
    for tower in ("text", "vision"):
        ops = _optimized_ops(tiny_artifacts / f"{tower}.fp32.onnx", tmp_path / f"{tower}.opt.onnx")
        assert ops["Erf"] == 0 and ops["Gelu"] + ops["BiasGelu"] > 0, (tower, ops)
