"""SmoothQuant for the int8 vision tower: move activation outliers into the weights before quantising.

Trained ViTs (and the stress weights, export/stress.py) carry a few activation channels 10-1000x larger
than the rest. Dynamic int8 quantises each matmul's activations with ONE scale per call, set by the
largest value, so those channels leave the others a handful of levels. SmoothQuant (Xiao et al. 2023)
divides each input channel j by s_j = max|X_j|^alpha / max|W_j|^(1-alpha) and multiplies row j of the
weight by the same s_j: the fp32 function is unchanged, the activation is flat enough to quantise.

Where the division goes: a matmul fed by a LayerNorm (attention's q/k/v, the MLP's first matmul, the
projection) gets it folded into that LayerNorm's weight and bias, so it costs nothing at run time; the
other matmuls with constant weights (attention's output projection, the MLP's second matmul, which
reads GELU's output) get an explicit Mul by 1/s in front of them. max|X_j| comes from running the fp32
graph on calibration images (never the verify set).

Only inputs that have outliers are smoothed: a matmul input whose largest channel maximum is under
`min_outlier_ratio` x the median one is left as it is. Smoothing an outlier-free input only reshuffles
quantisation error (it made the tiny test model's int8 scores worse); the full-size model's inputs
measured <= 3.8 with plain random weights and 4.7-17 with stress weights (benchmarks/QUANTIZATION.md).
"""

from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _consumers(graph) -> dict[str, list]:
    out = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            out[name].append(node)
    return out


def smoothable_matmuls(graph) -> tuple[dict[str, list], list]:
    """{LayerNorm name: its matmul consumers} for LayerNorms whose output only feeds matmuls with constant
    weights, and the other such matmuls (fed by anything else: they need an explicit Mul)."""
    inits = {t.name for t in graph.initializer}
    consumers = _consumers(graph)
    producer = {o: n for n in graph.node for o in n.output}

    def const_matmul(node) -> bool:
        return node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits

    folded: dict[str, list] = {}
    for node in graph.node:
        users = consumers[node.output[0]] if node.output else []
        if node.op_type == "LayerNormalization" and users and all(const_matmul(u) and u.input[0] == node.output[0] for u in users):
            folded[node.name] = users
    in_folded = {id(m) for users in folded.values() for m in users}
    explicit = [n for n in graph.node if const_matmul(n) and id(n) not in in_folded and n.input[0] in producer]
    return folded, explicit


def _own_input(arrays: dict[str, np.ndarray], node, index: int, suffix: str) -> str:
    """Give `node` a private copy of its initializer input `index` (the exporter shares initializers with
    equal values, such as every LayerNorm weight of a random model), so scaling it changes nothing else."""
    name = node.input[index]
    private = f"{name}__{suffix}"
    arrays[private] = arrays[name].copy()
    node.input[index] = private
    return private


def _weight_rows(model_arrays: dict[str, np.ndarray], node) -> np.ndarray:
    """The weight as [in, out] (a Gemm with transB=1 stores [out, in])."""
    w = model_arrays[node.input[1]]
    trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
    return w.T if trans_b else w


def _scale_rows(model_arrays: dict[str, np.ndarray], node, s: np.ndarray) -> None:
    trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
    w = model_arrays[node.input[1]]
    model_arrays[node.input[1]] = (w * s[None, :] if trans_b else w * s[:, None]).astype(w.dtype)


def channel_maxima(model_path: Path, tensors: list[str], calib: np.ndarray, input_name: str) -> dict[str, np.ndarray]:
    """max |x| per channel (the last axis) of each named tensor, over every token of every calibration image.
    The graph reduces them itself (Abs, ReduceMax over all but the last axis), so only [C] vectors leave it."""
    import onnx
    from onnx import helper

    from pickscore_runtime.ort_sessions import cpu_session

    model = onnx.load(str(model_path), load_external_data=False)
    del model.graph.output[:]
    axes = helper.make_tensor("channel_maxima_axes", onnx.TensorProto.INT64, [2], [0, 1])  # [B, T, C] -> [C]
    model.graph.initializer.append(axes)
    for i, name in enumerate(tensors):
        model.graph.node.extend([helper.make_node("Abs", [name], [f"channel_maxima_abs_{i}"]),
                                 helper.make_node("ReduceMax", [f"channel_maxima_abs_{i}", axes.name], [f"channel_maxima_{i}"],
                                                  keepdims=0)])
        model.graph.output.append(helper.make_tensor_value_info(f"channel_maxima_{i}", onnx.TensorProto.FLOAT, None))
    # Written beside the original so its external weights file is found by its relative location.
    with tempfile.NamedTemporaryFile(suffix=".onnx", dir=model_path.parent, delete=False) as f:
        probe = Path(f.name)
    try:
        onnx.save(model, str(probe))
        session = cpu_session(probe)
        maxima: dict[str, np.ndarray] = {}
        for start in range(0, len(calib), 4):
            for name, m in zip(tensors, session.run(None, {input_name: calib[start:start + 4]})):
                maxima[name] = np.maximum(maxima[name], m) if name in maxima else m
        return maxima
    finally:
        os.unlink(probe)


def outlier_ratio(channel_max: np.ndarray) -> float:
    return float(channel_max.max() / max(float(np.median(channel_max)), 1e-12))


def smoothing_divisors(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha) per input channel j, bounded to [1e-4, 1e4]."""
    s = np.power(np.maximum(x_max, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def smooth_quant(src: Path, dst: Path, calib: np.ndarray, alpha: float, min_outlier_ratio: float = 0.0) -> dict[str, Any]:
    """Write a smoothed copy of the fp32 graph `src` to `dst` (weights in one external file); returns a summary
    whose "applied" is False (and nothing is written) when no input reaches min_outlier_ratio."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(src), load_external_data=False).graph
    folded, explicit = smoothable_matmuls(graph)
    by_name = {n.name: n for n in graph.node}
    inputs = [by_name[ln].output[0] for ln in folded] + [m.input[0] for m in explicit]
    maxima = channel_maxima(src, list(dict.fromkeys(inputs)), calib, graph.input[0].name)
    if all(outlier_ratio(maxima[name]) < min_outlier_ratio for name in inputs):
        return {"alpha": alpha, "min_outlier_ratio": min_outlier_ratio, "applied": False,
                "max_outlier_ratio": round(max(outlier_ratio(maxima[name]) for name in inputs), 2)}

    model = onnx.load(str(src))  # with the weights
    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    by_name = {n.name: n for n in graph.node}
    folded, explicit = smoothable_matmuls(graph)

    def scales(x_max: np.ndarray, users: list) -> np.ndarray:
        w_max = np.max([np.abs(_weight_rows(arrays, u)).max(axis=1) for u in users], axis=0)
        return smoothing_divisors(x_max, w_max, alpha)

    ratios, skipped = [], 0
    for ln_name, users in folded.items():
        ln = by_name[ln_name]
        ratios.append(outlier_ratio(maxima[ln.output[0]]))
        if ratios[-1] < min_outlier_ratio:
            skipped += len(users)
            continue
        s = scales(maxima[ln.output[0]], users)
        for index in (1, 2):  # LayerNorm weight and bias
            name = _own_input(arrays, ln, index, f"smooth_{ln_name}")
            arrays[name] = (arrays[name] / s).astype(np.float32)
        for u in users:
            _own_input(arrays, u, 1, f"smooth_{u.name}")
            _scale_rows(arrays, u, s)
    new_nodes = []
    for i, mm in enumerate(explicit):
        ratios.append(outlier_ratio(maxima[mm.input[0]]))
        if ratios[-1] < min_outlier_ratio:
            skipped += 1
            continue
        s = scales(maxima[mm.input[0]], [mm])
        inv = f"smoothquant_inv_scale_{i}"
        arrays[inv] = (1.0 / s).astype(np.float32)
        smoothed = f"{mm.input[0]}_smoothed_{i}"
        new_nodes.append((mm, onnx.helper.make_node("Mul", [mm.input[0], inv], [smoothed], name=f"smoothquant_mul_{i}")))
        mm.input[0] = smoothed
        _own_input(arrays, mm, 1, f"smooth_{mm.name}")
        _scale_rows(arrays, mm, s)
    for mm, mul in new_nodes:  # each Mul just before its matmul keeps the graph topologically sorted
        graph.node.insert(list(graph.node).index(mm), mul)
    used = {name for node in graph.node for name in node.input}
    del graph.initializer[:]
    graph.initializer.extend(numpy_helper.from_array(a, name) for name, a in arrays.items() if name in used)
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=dst.name + ".data")
    return {"alpha": alpha, "min_outlier_ratio": min_outlier_ratio, "applied": True, "matmuls_folded_into_layernorms":
            sum(len(u) for n, u in folded.items() if outlier_ratio(maxima[by_name[n].output[0]]) >= min_outlier_ratio),
            "matmuls_with_explicit_mul": len(new_nodes), "matmuls_left_alone": skipped,
            "max_outlier_ratio": round(max(ratios), 2) if ratios else None}
