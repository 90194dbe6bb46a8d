"""int8 weights for OpenVINO's CPU plugin, made at load from the fp32 ONNX (the openvino backend's `int8`).

Every MatMul whose second input is a constant matrix [K, N] gets that constant replaced by int8 values
times one fp32 scale per output column (symmetric: max |w| / 127), in the form OpenVINO's CPU plugin
recognises as compressed weights: Constant(i8) -> Convert(f32) -> Multiply(scale) -> MatMul. The plugin
keeps such weights in int8 and, with DYNAMIC_QUANTIZATION_GROUP_SIZE set, quantises each token's
activations per group of that many input channels as it runs, then multiplies in int8 (VNNI / AMX).

Why this and not ONNX Runtime's int8 graph: per-column weight scales and per-token, per-group activation
scales are the granularity ONNX Runtime's dynamic quantisation lacks (one activation scale per tensor,
which one outlier token sets for all 257), so no matmul has to be kept in fp32 to pass the gate on stress
weights (benchmarks/QUANTIZATION.md, issue 22). NNCF's `compress_weights` writes the same pattern (with
fp16 scales); doing it here keeps NNCF and its dependencies out of the runtime.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

# Activations are quantised per token in groups of this many input channels. Measured at full size (issue 22,
# QUANTIZATION.md): 32 runs 20-25 % slower for one more pair of gate margin; 256 halves the margin on stress
# weights for ~5 %; 1,280 fails the gate.
ACTIVATION_GROUP = 128


def int8_columns(weights: np.ndarray, reduce_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, fp32 scales) with one symmetric scale per output column; an all-zero column gets scale 1."""
    scale = np.abs(weights).max(axis=reduce_axis, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.rint(weights / scale), -127, 127).astype(np.int8), scale


def compress_matmul_weights(model: Any, keep: Callable[[tuple[int, ...]], bool] | None = None) -> int:
    """Rewrite `model` (an openvino.Model) in place: every constant fp32 2-D MatMul weight becomes int8 with
    per-column scales, except those `keep(shape)` says to leave. Returns how many were rewritten."""
    import openvino.opset13 as ops

    count = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        source = op.input_value(1).get_node()
        attributes = op.get_attributes()
        if source.get_type_name() != "Constant" or attributes["transpose_a"]:
            continue
        weights = source.get_data()
        if weights.dtype != np.float32 or weights.ndim != 2 or (keep and keep(tuple(weights.shape))):
            continue
        values, scale = int8_columns(weights, reduce_axis=1 if attributes["transpose_b"] else 0)  # reduce over K
        dequantised = ops.multiply(ops.convert(ops.constant(values), "f32"), ops.constant(scale))
        op.input(1).replace_source_output(dequantised.output(0))
        count += 1
    model.validate_nodes_and_infer_types()
    return count
