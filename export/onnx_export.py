"""PyTorch towers -> ONNX files, driven by the runtime's tower specs (names, dtypes, dynamic axes).

fp32 is exported with torch.onnx (dynamo); fp16 is derived from the fp32 graph with ONNX Runtime's
float16 converter, keeping the numerically sensitive ops (LayerNorm, softmax, reductions, pow/sqrt and
the final L2 normalisation) in fp32 and the tower's inputs/outputs fp32.
"""

from __future__ import annotations

import logging
from pathlib import Path

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
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

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
    external = sum(_tensor_nbytes(t) for t in model16.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    onnx.save(model16, str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
              location=dst.name + ".data" if external else None)


def _tensor_nbytes(t) -> int:
    import onnx

    return int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


# Dynamic quantisation: int8 weights for the matmuls that hold >95 % of the
# FLOPs; activations quantised per call. The patch-embedding Conv and everything else stay fp32.
INT8_OPS = ["MatMul", "Gemm"]
# Only the vision tower is quantised. Measured on the full architecture: int8 text embeddings reached
# cosine 0.998 (vs 0.9996 for vision) and dominated the score error, while the text tower costs 7x less
# than the vision tower per item and its outputs are cached.
INT8_TOWERS = ("vision",)
INT8_SKIPPED_NOTE = "fp32 (the text tower is not quantised: see INT8_TOWERS in export/onnx_export.py)"


def quantize_int8(src: Path, dst: Path, per_channel: bool = False, attention_matmuls: bool = False) -> None:
    # The defaults are what ships. per_channel=False: as fast as per-channel and the more accurate one
    # on AVX2 CPUs (min image cosine 0.99979 vs 0.99945), a little less accurate on VNNI CPUs (0.99976 vs
    # 0.99985): benchmarks/QUANTIZATION.md. Trained weights with outlier channels may favour
    # per-channel: re-measure with `pickscore verify --precision int8` when they can be had.
    # attention_matmuls=False: attention's activation x activation matmuls stay fp32; quantising them
    # measured no speed difference beyond noise.
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src), str(dst), op_types_to_quantize=INT8_OPS, per_channel=per_channel, weight_type=QuantType.QInt8,
        use_external_data_format=False,  # int8 towers are < 1 GB: one self-contained file
        extra_options={"MatMulConstBOnly": not attention_matmuls},
    )
