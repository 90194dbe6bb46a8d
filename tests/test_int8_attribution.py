"""benchmarks/experiments/int8_attribution.py ranked int8 plans by emulating them in PyTorch (the experiment
behind the shipped int8 plan: benchmarks/experiments/README.md); its weight and activation quantisers must
be ONNX Runtime's, or its rankings mean nothing. Checked against quantize_dynamic's own weights for every
scheme of export/onnx_export.WEIGHT_SCHEMES, and against DynamicQuantizeLinear run by ONNX Runtime, so a
change to either that would invalidate the recorded ranking (or a rerun) fails here.

The script stays with its experiment (it is not product code) and is loaded by path, as a script."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def attribution():
    spec = importlib.util.spec_from_file_location("int8_attribution", REPO / "benchmarks" / "experiments" / "int8_attribution.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("scheme", ["tensor", "channel", "channel7", "channel_u8"])
def test_emulated_weights_are_onnx_runtimes(attribution, scheme, tmp_path):
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from pickscore_export.onnx_export import WEIGHT_SCHEMES, quantize_int8

    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, 96)).astype(np.float32)  # [in, out] as MatMul stores it
    w[:, 5] *= 6  # an outlier output column, as the stress weights' MLP units
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 96])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "mm.onnx"))
    per_channel, reduce_range, weight_type = WEIGHT_SCHEMES[scheme]
    quantize_int8(tmp_path / "mm.onnx", tmp_path / "mm.int8.onnx", per_channel=per_channel, reduce_range=reduce_range,
                  weight_type=weight_type)
    arrays = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "mm.int8.onnx")).graph.initializer}
    q, scale, zero = (arrays[f"w_{k}"] for k in ("quantized", "scale", "zero_point"))
    ort_weights = (q.astype(np.float32) - zero.astype(np.float32)) * scale  # per-column scales broadcast over rows
    emulated = attribution.fake_quant_weight(torch.from_numpy(w.T.copy()), scheme).numpy().T  # Linear keeps [out, in]
    np.testing.assert_allclose(emulated, ort_weights, rtol=0, atol=1e-6 * np.abs(w).max())


def test_emulated_activations_are_dynamic_quantize_linears(attribution):
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    x = np.random.default_rng(1).normal(size=(3, 7, 16)).astype(np.float32)
    x[0, 2, 3] = 40.0  # one massive value sets the step for all
    graph = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info(n, t, None) for n, t in
                               (("q", TensorProto.UINT8), ("s", TensorProto.FLOAT), ("z", TensorProto.UINT8))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    q, s, z = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(attribution.fake_quant_activation(torch.from_numpy(x)).numpy(),
                               (q.astype(np.float32) - float(z)) * s, rtol=0, atol=1e-6)
