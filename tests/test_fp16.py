"""fp16 artifacts: structure (fp32 IO and fp32 sensitive ops) and numerics against the fp32 reference."""

from __future__ import annotations

import onnx
import pytest

from pickscore_export.onnx_export import FP16_KEEP_FP32_OPS


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_fp16_graph_keeps_io_and_sensitive_ops_fp32(tiny_artifacts, tower):
    model = onnx.load(str(tiny_artifacts / f"{tower}.fp16.onnx"))
    graph = onnx.shape_inference.infer_shapes(model).graph
    fp32 = onnx.TensorProto.FLOAT
    assert all(v.type.tensor_type.elem_type in (fp32, onnx.TensorProto.INT64) for v in graph.input)
    assert all(v.type.tensor_type.elem_type == fp32 for v in graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    kept = [n for n in graph.node if n.op_type in FP16_KEEP_FP32_OPS]
    assert {n.op_type for n in kept} >= {"LayerNormalization", "Softmax", "ReduceL2"}
    for node in kept:
        for name in node.input:
            if name and name in types:  # (axes inputs are int64; what matters is that nothing is fp16)
                assert types[name] != onnx.TensorProto.FLOAT16, f"{node.op_type} {node.name} input {name} is fp16"
        assert types[node.input[0]] == fp32
    matmul_weights = [types[i] for n in graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input
                      if i in {t.name for t in graph.initializer}]
    assert matmul_weights and all(t == onnx.TensorProto.FLOAT16 for t in matmul_weights)


def test_fp16_passes_its_gate_on_cpu(tiny_artifacts):
    """ONNX Runtime's CPU provider runs the fp16 graph too, so its tolerance is checked here; the CUDA
    provider (what fp16 is for) is covered by the gpu-marked tests."""
    from pickscore_export.verify import verify

    report = verify(tiny_artifacts, precision="fp16")
    assert report["precision"] == "fp16"
    assert report["passed"], report["failures"]
