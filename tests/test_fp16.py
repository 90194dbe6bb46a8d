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


FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_fp16_graph_is_clean_for_strongly_typed_builders(tiny_artifacts, tower):
    """A strongly typed builder (TensorRT 11 builds nothing else) runs exactly the types the graph
    declares, so the graph must type-check strictly and change precision only through explicit Casts."""
    path = tiny_artifacts / f"{tower}.fp16.onnx"
    onnx.checker.check_model(str(path), full_check=True)  # topological order, types, strict shape inference
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    types.update({n.output[0]: a.t.data_type for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"})
    untyped = [name for n in graph.node for name in list(n.input) + list(n.output) if name and name not in types]
    assert not untyped, f"tensors without an inferred type: {untyped[:5]}"
    mixed = {n.name: sorted({types[x] for x in list(n.input) + list(n.output) if x and types[x] in FLOATS})
             for n in graph.node if n.op_type != "Cast"}
    assert not {name: t for name, t in mixed.items() if len(t) > 1}, "a node mixes float types without a Cast"
    casts = [n for n in graph.node if n.op_type == "Cast"]
    assert casts and all(types[n.input[0]] != types[n.output[0]] for n in casts), "a Cast that changes nothing"


def test_fp16_passes_its_gate_on_cpu(tiny_artifacts):
    """ONNX Runtime's CPU provider runs the fp16 graph too, so its tolerance is checked here; the CUDA
    provider (what fp16 is for) is covered by the gpu-marked tests."""
    from pickscore_export.verify import verify

    report = verify(tiny_artifacts, precision="fp16")
    assert report["precision"] == "fp16"
    assert report["passed"], report["failures"]
