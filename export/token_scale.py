"""Per-token activation scales for dynamic int8, built from the ops ONNX Runtime already runs fast.

ONNX Runtime's dynamic int8 (`DynamicQuantizeMatMul`) gives a matmul's whole activation tensor one scale
per call. A token whose row is much larger than the others (a LayerNorm turns a token with one massive
residual channel into a near one-hot row of magnitude ~sqrt(d): trained ViTs' "register" tokens, the stress
weights of export/stress.py) then sets the step for every other token, which are left a few levels.
SmoothQuant (export/smooth.py) cannot help: it rescales channels, and this outlier is a token.

Per-token quantisation without a new kernel: divide each row of the matmul's input by its own max |x|
(every row then spans at most [-1, 1], so the one per-tensor scale suits them all), run the unchanged
dynamic int8 matmul, and multiply each output row by the same max |x|. In fp32 this is the identity:

    (x / s) @ W * s == x @ W,    s = max_j |x_ij| per row i

Cost: Abs, ReduceMax and Div over the input and one Mul over the output, per rescaled input. Needs
opset >= 18 (ReduceMax's axes as an input), as exported.

Measured on the full stress model it bought 0.0001 of image cosine: the massive tokens were not what
broke int8 there (benchmarks/QUANTIZATION.md). It stays an option of quantize_int8, not part of the plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# Which matmul inputs get per-token scales. "layernorm": the inputs a LayerNorm produces (attention's
# q/k/v, the MLP's first matmul), where a massive residual token becomes a large row; "all": every
# matmul with constant weights.
TOKEN_SCALE_SCOPES = ("layernorm", "all")


def scale_tokens(src: Path, dst: Path, scope: str = "layernorm") -> dict[str, Any]:
    """Write a copy of the fp32 graph `src` to `dst` (weights in one external file) in which the inputs of
    the constant-weight matmuls in `scope` are divided by their per-row max |x| and the outputs
    multiplied back. Returns a summary for the manifest."""
    import onnx
    from onnx import helper

    if scope not in TOKEN_SCALE_SCOPES:
        raise ValueError(f"scope {scope!r}: expected one of {TOKEN_SCALE_SCOPES}")
    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def wanted(node) -> bool:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            return False
        source = producer.get(node.input[0])
        return source is not None and (scope == "all" or source.op_type == "LayerNormalization")

    axes, eps = "token_scale_axes", "token_scale_eps"
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), axes),
                              onnx.numpy_helper.from_array(np.array(1e-30, dtype=np.float32), eps)])
    row_scale: dict[str, str] = {}  # input tensor -> its per-row scale tensor
    nodes, rescaled = [], 0
    for node in graph.node:
        if not wanted(node):
            nodes.append(node)
            continue
        x = node.input[0]
        i = len(row_scale)
        if x not in row_scale:
            row_scale[x] = f"token_scale_{i}"
            nodes.extend([
                helper.make_node("Abs", [x], [f"token_scale_abs_{i}"], name=f"token_scale_abs_{i}"),
                helper.make_node("ReduceMax", [f"token_scale_abs_{i}", axes], [f"token_scale_max_{i}"], keepdims=1,
                                 name=f"token_scale_max_{i}"),
                helper.make_node("Max", [f"token_scale_max_{i}", eps], [row_scale[x]], name=f"token_scale_{i}"),
                helper.make_node("Div", [x, row_scale[x]], [f"{x}_token_scaled"], name=f"token_scale_div_{i}"),
            ])
        node.input[0] = f"{x}_token_scaled"
        out = node.output[0]
        node.output[0] = f"{out}_token_scaled"
        nodes.extend([node, helper.make_node("Mul", [node.output[0], row_scale[x]], [out],
                                             name=f"token_unscale_{rescaled}")])
        rescaled += 1
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=dst.name + ".data")
    return {"scope": scope, "inputs_rescaled": len(row_scale), "matmuls_rescaled": rescaled}

