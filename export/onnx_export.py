"""PyTorch towers -> ONNX files, driven by the runtime's tower specs (names, dtypes, dynamic axes).

fp32 is exported with torch.onnx (dynamo); fp16 is derived from the fp32 graph with ONNX Runtime's
float16 converter, keeping the numerically sensitive ops (LayerNorm, softmax, reductions, pow/sqrt and
the final L2 normalisation) in fp32 and the tower's inputs/outputs fp32.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from pickscore_runtime.towers import DYNAMIC_AXES, TowerSpec

log = logging.getLogger("pickscore")

OPSET = 18
# Protobuf cannot hold more than 2 GB: bigger towers keep their weights in one external-data file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
FP16_KEEP_FP32_OPS = ["LayerNormalization", "Softmax", "ReduceL2", "ReduceMean", "ReduceSum", "Pow", "Sqrt"]


def example_input(spec: TowerSpec, special_ids: tuple[int, int], batch: int = 2, sequence: int = 7):
    """A deterministic input for tracing; text gets <|startoftext|> a few tokens <|endoftext|> (special_ids),
    a realistic prompt, so export sees the pooling path."""
    import torch

    shape = [{"batch": batch, "sequence": sequence}.get(d, d) if isinstance(d, str) else d for d in spec.input.shape]
    if spec.input.dtype == "int64":
        bos, eos = special_ids
        ids = torch.randint(1, min(bos, eos), shape, generator=torch.Generator().manual_seed(0))
        ids[:, 0], ids[:, -1] = bos, eos
        return ids
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def export_fp32(module, spec: TowerSpec, path: Path, opset: int, special_ids: tuple[int, int]) -> None:
    """Export one tower. Dynamic axes come from the spec; weights go external only when they must."""
    import torch

    # torch.onnx warns about every torchvision op it cannot register; CLIP uses none of them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    dims = {name: torch.export.Dim(name, min=lo, max=hi) for name, (lo, hi) in DYNAMIC_AXES.items()}
    # positional, one per input: the tower's forward names its argument x, the graph names it after the spec
    dynamic = tuple({axis: dims[name] for axis, name in t.dynamic_axes().items()} for t in spec.inputs)
    with torch.no_grad():
        program = torch.onnx.export(
            module, (example_input(spec, special_ids),), dynamo=True, opset_version=opset,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_shapes=dynamic, verbose=False,
        )
    # Size what the graph holds, not the module: a tower module also owns the other tower's weights.
    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    program.save(str(path), external_data=weights > EXTERNAL_DATA_THRESHOLD)
    _check_single_external_file(path)
    reorder_erf_gelu(path)


def reorder_erf_gelu(path: Path) -> int:
    """Rewrite the exporter's GELU, x * (0.5 * (1 + erf(x / sqrt2))), as (x * (1 + erf(x / sqrt2))) * 0.5.

    ONNX Runtime's GeluFusion knows the second order but not the first, so the exporter's GELU ran as
    five unfused ops (~5.5 % of the int8 vision tower's kernel time; fused, 2.2 %: benchmarks/QUANTIZATION.md). Bitwise
    exact before fusion: scaling by 0.5 is exact in binary floating point. Only the graph is rewritten;
    the external weights file is untouched.
    Returns how many GELUs were reordered.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {t.name: t for t in graph.initializer if not t.external_data}
    constants.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"})

    def scalar(name: str) -> float | None:
        t = constants.get(name)
        return float(numpy_helper.to_array(t)) if t is not None and int(np.prod(t.dims)) == 1 else None

    def other(node, name: str) -> str | None:
        rest = [i for i in node.input if i != name]
        return rest[0] if len(rest) == 1 and len(node.input) == 2 else None

    reordered = 0
    for outer in graph.node:  # outer = Mul(x, inner); inner = Mul(0.5, add); add = Add(erf, 1); erf = Erf(x / sqrt2)
        if outer.op_type != "Mul" or len(outer.input) != 2:
            continue
        for x, inner_out in (outer.input, outer.input[::-1]):
            inner = producer.get(inner_out)
            if inner is None or inner.op_type != "Mul":
                continue
            half = next((i for i in inner.input if scalar(i) == 0.5), None)
            add = producer.get(other(inner, half)) if half else None
            if add is None or add.op_type != "Add":
                continue
            one = next((i for i in add.input if scalar(i) == 1.0), None)
            erf = producer.get(other(add, one)) if one else None
            div = producer.get(erf.input[0]) if erf is not None and erf.op_type == "Erf" else None
            if div is None or div.op_type != "Div" or div.input[0] != x or not np.isclose(scalar(div.input[1]) or 0, 2 ** 0.5):
                continue
            # inner becomes x * add, outer becomes inner * 0.5; both tensor names keep their producers.
            inner.input[:] = [x, add.output[0]]
            outer.input[:] = [inner_out, half]
            reordered += 1
            break
    if reordered:
        onnx.save(model, str(path))
    return reordered


def _check_single_external_file(path: Path) -> None:
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value for t in model.graph.initializer if uses_external_data(t)
        for entry in t.external_data if entry.key == "location"
    }
    if len(locations) > 1:
        raise RuntimeError(f"{path}: weights spread over {len(locations)} external files, expected at most one")


def external_data_file(path: Path) -> Path | None:
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if uses_external_data(t):
            location = next(e.value for e in t.external_data if e.key == "location")
            return path.parent / location
    return None


def convert_fp16(src: Path, dst: Path, spec: TowerSpec) -> None:
    """The fp16 graph is THE precision plan of every GPU engine: strongly typed builders (TensorRT 11
    builds nothing else) run exactly the types it declares. So every precision change in it is an
    explicit Cast, and the saved file must pass ONNX's full check (type constraints, strict shape
    inference) before it ships."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))  # with its external data
    output_producer = [n.name for n in model.graph.node if spec.output.name in n.output]
    model16 = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=FP16_KEEP_FP32_OPS, node_block_list=output_producer,
        disable_shape_infer=True,
    )
    del model
    # The exporter's value_info still says fp32 for tensors that are fp16 now; stale annotations make
    # shape inference (and stricter parsers such as TensorRT's) reject the graph, so drop them.
    del model16.graph.value_info[:]
    _drop_noop_initializer_casts(model16.graph)
    # The converter appends the Casts it inserts after the nodes that consume them; ONNX requires
    # topological order (onnx.checker and TensorRT's parser refuse the graph otherwise).
    OnnxModel.graph_topological_sort(model16.graph)
    external = sum(_tensor_nbytes(t) for t in model16.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    onnx.save(model16, str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
              location=dst.name + ".data" if external else None)
    onnx.checker.check_model(str(dst), full_check=True)  # from the path: works past protobuf's 2 GB


def _drop_noop_initializer_casts(graph) -> None:
    """The converter casts an fp32 initializer that only kept-fp32 ops read (one tensor shared by several
    LayerNorms, as the exporter deduplicates equal weights) to fp32: a Cast that changes nothing. Its
    consumers read the initializer itself instead."""
    dtype = {t.name: t.data_type for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    noop = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast" and n.output[0] not in outputs
            and dtype.get(n.input[0]) == next(a.i for a in n.attribute if a.name == "to")}
    kept = [n for n in graph.node if not (n.op_type == "Cast" and n.output[0] in noop)]
    for node in kept:
        node.input[:] = [noop.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)


def _tensor_nbytes(t) -> int:
    import onnx

    return int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


# Dynamic quantisation: int8 weights for the matmuls that hold >95 % of the
# FLOPs; activations quantised per call. The patch-embedding Conv and everything else stay fp32.
INT8_OPS = ["MatMul", "Gemm"]
# SmoothQuant before quantising (export/smooth.py): with the activation outliers of trained ViTs (stress
# weights) plain dynamic int8 failed gate v2 (min image cosine 0.9991, 24 decisive pairs flipped);
# smoothed at alpha 0.5 it reached 0.99988 there. alpha 0.8 moved too much into the weights (0.9979).
INT8_SMOOTH_ALPHA = 0.5
INT8_SMOOTH_MIN_OUTLIER_RATIO = 5.0  # inputs with fewer outliers are not smoothed (see export/smooth.py)
# What export ships (benchmarks/QUANTIZATION.md, "Where the stress error comes from"): SmoothQuant, then
# per-tensor int8 weights, except the MLP's first matmul (fc1) and the final projection, kept fp32, and the
# MLP's second matmul (fc2), uint8 weights with one scale per output column (u8 x u8 kernels: no saturation
# on CPUs without VNNI). Emulated attribution put 74 % of the stress weights' int8 error in fc1's weights
# (outlier units as rows) and 8.5 % in the projection (0.4 % of the work, written per image). Under gate v3
# (docs/numerics.md) this plan is the only one measured that passes at full size on plain and stress weights;
# the plan before it (every weight per-tensor int8) fails both, and fc1 as per-channel uint8 instead of fp32
# (24-28 % faster than this) fails stress on resolved-pair order (0.9948 < 0.995). Cost: ~25 % slower than the
# plan before it on an AVX2 CPU. `pickscore export --int8-plan fast` ships the faster plan, for weights where
# it passes (the gate at export says).
_SMOOTHED = {"smooth_alpha": INT8_SMOOTH_ALPHA, "smooth_min_outlier_ratio": INT8_SMOOTH_MIN_OUTLIER_RATIO,
             "per_channel": False, "reduce_range": False, "weight_type": "int8"}
INT8_PLANS = {
    "default": {**_SMOOTHED, "role_weights": {"mlp_down": "channel_u8"}, "keep_fp32": ["mlp_up", "projection"]},
    "fast": {**_SMOOTHED, "role_weights": {"mlp_up": "channel_u8"}, "keep_fp32": ["projection"]},
}
INT8_PLAN = INT8_PLANS["default"]
INT8_CALIBRATION_IMAGES = 32
# Only the vision tower is quantised. Measured on the full architecture: int8 text embeddings reached
# cosine 0.998 (vs 0.9996 for vision) and dominated the score error, while the text tower costs 7x less
# than the vision tower per item and its outputs are cached.
INT8_TOWERS = ("vision",)
INT8_SKIPPED_NOTE = "fp32 (the text tower is not quantised: see INT8_TOWERS in export/onnx_export.py)"


def weight_matmuls(model_path: Path) -> list[tuple[str, str, list[int], str]]:
    """(name, op type, weight shape, module path) of each MatMul/Gemm with a constant weight; the module path
    is the `namespace` metadata the exporter records on each node (".encoder.layers.<block>.mlp.fc1...")."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    return [(n.name, n.op_type, shapes[n.input[1]], next((p.value for p in n.metadata_props if p.key == "namespace"), ""))
            for n in graph.node if n.op_type in INT8_OPS and len(n.input) > 1 and n.input[1] in shapes]


def mlp_down_projections(model_path: Path) -> list[str]:
    """The MatMuls that reduce features at least 2x (the MLP's second matmul, 4d -> d), found by their
    constant weight's shape: the inputs that carry the MLP's outlier units (benchmarks/QUANTIZATION.md)."""
    return [name for name, op, shape, _ in weight_matmuls(model_path)
            if op == "MatMul" and len(shape) == 2 and shape[0] >= 2 * shape[1]]


def mlp_up_projections(model_path: Path) -> list[str]:
    """The MatMuls that widen features at least 2x (the MLP's first matmul, d -> 4d): their weights hold the
    MLP's outlier units as rows, which one scale per matrix serves badly (benchmarks/QUANTIZATION.md)."""
    return [name for name, op, shape, _ in weight_matmuls(model_path)
            if op == "MatMul" and len(shape) == 2 and 2 * shape[0] <= shape[1]]


def _located_matmuls(model_path: Path) -> list[tuple[str, str]]:
    """(name, module path) of each weight matmul; refuses a graph whose nodes carry no module paths, where
    every matmul would look like it sits outside the encoder blocks."""
    found = [(name, module) for name, _, _, module in weight_matmuls(model_path)]
    if not any(".encoder.layers." in module for _, module in found):
        raise ValueError(f"matmul roles by block: {model_path.name} records no module paths (namespace metadata)")
    return found


def encoder_block_matmuls(model_path: Path, block: int) -> list[str]:
    """The weight matmuls of encoder block `block`."""
    return [name for name, module in _located_matmuls(model_path) if f".encoder.layers.{block}." in module]


def output_projections(model_path: Path) -> list[str]:
    """The weight matmuls outside the encoder blocks: the tower's final projection."""
    return [name for name, module in _located_matmuls(model_path) if ".encoder.layers." not in module]


MATMUL_ROLES = {"mlp_up": mlp_up_projections, "mlp_down": mlp_down_projections, "projection": output_projections}


def role_matmuls(model_path: Path, role: str) -> list[str]:
    """The MatMuls a role names: one of MATMUL_ROLES, or "block:N" (every weight matmul of encoder block N)."""
    kind, _, index = role.partition(":")
    found = (encoder_block_matmuls(model_path, int(index)) if kind == "block" and index.isdigit()
             else MATMUL_ROLES[role](model_path) if role in MATMUL_ROLES else None)
    if found is None:
        raise ValueError(f"matmul role {role!r}: not one of {sorted(MATMUL_ROLES)} or block:N")
    if not found:
        raise ValueError(f"matmul role {role!r}: {model_path.name} has no such matmul")
    return found


# Weight schemes by name, as quantize_dynamic's (per_channel, reduce_range, weight_type); a plan's
# role_weights gives some roles their own (benchmarks/experiments/int8_attribution.py emulates the same schemes).
WEIGHT_SCHEMES = {"tensor": (False, False, "int8"), "channel": (True, False, "int8"),
                  "channel7": (True, True, "int8"), "channel_u8": (True, False, "uint8")}


def quantize_int8(src: Path, dst: Path, per_channel: bool = False, attention_matmuls: bool = False,
                  smooth_alpha: float | None = None, calibration: np.ndarray | None = None,
                  smooth_min_outlier_ratio: float = INT8_SMOOTH_MIN_OUTLIER_RATIO,
                  keep_fp32: Sequence[str] = (), token_scale: str | None = None,
                  reduce_range: bool = False, weight_type: str = "int8",
                  role_weights: dict[str, str] | None = None) -> dict | None:
    """Dynamic int8 of `src`, SmoothQuant-ed first when smooth_alpha is given (calibration: preprocessed
    pixels, never the verify set), with per-token activation scales where token_scale names a scope
    (export/token_scale.py), the matmuls of keep_fp32's roles left fp32 and those of role_weights' roles
    quantised with their own weight scheme (WEIGHT_SCHEMES). Returns a summary of what was done besides
    quantising, if anything."""
    # What ships is INT8_PLAN (build.py passes it); the defaults here are plain dynamic quantisation.
    # weight_type "uint8": ONNX Runtime's u8 x u8 kernels, which cannot saturate on CPUs without VNNI.
    # attention_matmuls=False: attention's activation x activation matmuls stay fp32; quantising them
    # measured no speed difference beyond noise.
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .smooth import smooth_quant
    from .token_scale import scale_tokens

    summary = None
    with tempfile.TemporaryDirectory(prefix="smoothquant-", dir=dst.parent) as tmp:
        if smooth_alpha is not None:
            if calibration is None:
                raise ValueError("SmoothQuant needs calibration pixels")
            smoothed = Path(tmp) / src.name
            summary = smooth_quant(src, smoothed, calibration, smooth_alpha, smooth_min_outlier_ratio)
            src = smoothed if summary["applied"] else src
        if token_scale is not None:
            scaled = Path(tmp) / f"token-scaled-{src.name}"
            summary = {**(summary or {}), "token_scales": scale_tokens(src, scaled, token_scale)}
            src = scaled
        excluded = [name for role in keep_fp32 for name in role_matmuls(src, role)]
        own_scheme = {role: [n for n in role_matmuls(src, role) if n not in excluded] for role in role_weights or {}}

        def quantize(source: Path, target: Path, scheme: tuple, **nodes) -> None:
            per_ch, reduced, weights = scheme
            # quantize_dynamic turns a Gemm into a MatMul named <name>_MatMul before it reads the node lists
            nodes = {k: [f for n in names for f in (n, f"{n}_MatMul")] for k, names in nodes.items()}
            quantize_dynamic(
                str(source), str(target), op_types_to_quantize=INT8_OPS, per_channel=per_ch, reduce_range=reduced,
                weight_type={"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[weights],
                # int8 towers are < 1 GB: one self-contained file; a pass that leaves most weights fp32 is not
                use_external_data_format=target.parent == Path(tmp),
                extra_options={"MatMulConstBOnly": not attention_matmuls}, **nodes)

        # One pass per role with its own scheme (quantize_dynamic takes one scheme per call), then the rest.
        for i, (role, names) in enumerate(own_scheme.items()):
            step = Path(tmp) / f"role{i}-{src.name}"
            quantize(src, step, WEIGHT_SCHEMES[role_weights[role]], nodes_to_quantize=names)
            src = step
        quantize(src, dst, (per_channel, reduce_range, weight_type), nodes_to_exclude=excluded)
        if keep_fp32:
            summary = {**(summary or {}), "kept_fp32": {"roles": list(keep_fp32), "matmuls": len(excluded)}}
        if role_weights:
            summary = {**(summary or {}), "role_weights": {r: {"scheme": role_weights[r], "matmuls": len(n)}
                                                           for r, n in own_scheme.items()}}
    return summary
