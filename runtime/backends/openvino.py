"""OpenVINO's CPU plugin reading the exported ONNX towers directly (the optional `openvino` backend, pip extra
[openvino]; imported only when this backend is opened).

One compiled model per tower, dynamic batch (and sequence) axes as exported, `PERFORMANCE_HINT=LATENCY`,
`INFERENCE_NUM_THREADS` from `threads` (else $PICKSCORE_THREADS, else OpenVINO's own choice). Precisions:

- `fp32`: the fp32 ONNX with `INFERENCE_PRECISION_HINT=f32`: exact, gated as fp32.
- `bf16`: the same fp32 ONNX with the hint `bf16`: OpenVINO runs its matmuls in bf16 where the CPU has
  AVX512-BF16 or AMX, and silently in f32 where it has not (an AVX2-only CPU).
- `int8`: the same fp32 ONNX, the vision tower's matmul weights made int8 at load (one scale per output
  column: openvino_weights.py), its activations quantised per token in groups of 128 channels as it runs
  (DYNAMIC_QUANTIZATION_GROUP_SIZE), f32 for the rest of it and for the text tower (exact, as in onnx-cpu's
  int8). Not ONNX Runtime's int8 graph: OpenVINO runs that graph's integer matmuls on float kernels, at no int8
  speed.

What a hint asks for and what runs can differ, so the backend reads the compiled models back:
`effective_precision` names the precisions the vision tower's matmul kernels (FullyConnected, MatMul,
Convolution) really run ("fp32", "bf16", "int8+fp32"...; "(int8 weights)" where the plugin declined dynamic
quantisation and widens int8 weights to float), then the text tower's where they differ ("int8+fp32; text
fp32"), and `kernel_precisions` counts them per tower.
Bench rows and verify reports name it (`runs`, through base.effective_precision)."""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from typing import Any

import numpy as np

from ..artifacts import Artifacts
from ..errors import PickScoreError
from ..optional import require
from ..towers import TOWERS
from .base import BackendBase
from .openvino_weights import ACTIVATION_GROUP, compress_matmul_weights
from .registry import BACKENDS

log = logging.getLogger("pickscore")

# INFERENCE_PRECISION_HINT per precision and tower. int8: f32 around the vision tower's int8 matmuls (with bf16
# there it failed gate v3 on stress weights) and in the text tower (bf16 passed at full size but failed on the tiny
# model; int8 text failed at full size): benchmarks/QUANTIZATION.md
HINTS = {"fp32": {"text": "f32", "vision": "f32"}, "bf16": {"text": "bf16", "vision": "bf16"},
         "int8": {"text": "f32", "vision": "f32"}}
INT8_TOWERS = ("vision",)  # the towers whose weights int8 makes int8
MATMULS = ("FullyConnected", "MatMul", "Convolution", "ScaledDotProductAttention")  # layer types whose precision counts
KERNEL_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16", "u8": "int8", "i8": "int8"}
ORDER = ("int8", "fp16", "bf16", "fp32")


def kernel_precisions(compiled: Any) -> Counter:
    """How many matmul-like layers of a compiled model run in each precision (OpenVINO's runtime model:
    the layers as the CPU plugin executes them, after its own precision choices)."""
    counts: Counter = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if str(info["layerType"].astype(str)) in MATMULS:
            precision = str(info["runtimePrecision"].astype(str))
            counts[KERNEL_NAMES.get(precision, precision)] += 1
    return counts


def describe(counts: Counter) -> str:
    """"fp32", "bf16", "int8+bf16"...: the precisions present, lowest first."""
    names = sorted(counts, key=lambda p: ORDER.index(p) if p in ORDER else len(ORDER))
    return "+".join(names) or "none"


class OpenVinoBackend(BackendBase):
    def __init__(self, artifacts: Artifacts, name: str, precision: str, batch_size: int, threads: int | None = None):
        ov = require("openvino", f"backend {name}", extra="openvino")  # MissingExtraError naming [openvino]
        if precision not in HINTS:
            raise ValueError(f"backend {name} runs {', '.join(HINTS)}, not {precision!r}")
        self.name, self.precision, self.batch_size = name, precision, batch_size
        self.device = "cpu"
        self.specs = artifacts.specs()
        config = {"PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": int(threads or int(os.environ.get("PICKSCORE_THREADS", 0)) or 0)}
        core, files = ov.Core(), BACKENDS["openvino"].files_for(precision)
        models = {tower: core.read_model(str(artifacts.tower_file(tower, files))) for tower in TOWERS}
        if precision == "int8":
            self.int8_matmuls = {tower: compress_matmul_weights(models[tower]) for tower in INT8_TOWERS}
            config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = ACTIVATION_GROUP
        self._compiled = {tower: core.compile_model(model, "CPU", {**config, "INFERENCE_PRECISION_HINT": HINTS[precision][tower]})
                          for tower, model in models.items()}
        # an InferRequest runs one call at a time and its output tensor is reused: one per tower, behind a lock
        self._requests = {tower: compiled.create_infer_request() for tower, compiled in self._compiled.items()}
        self._locks = {tower: threading.Lock() for tower in TOWERS}
        self.inference_precision = {tower: c.get_property("INFERENCE_PRECISION_HINT").to_string()
                                    for tower, c in self._compiled.items()}
        self.kernel_precisions = {tower: dict(kernel_precisions(c)) for tower, c in self._compiled.items()}
        vision, text = (describe(Counter(self.kernel_precisions[tower])) for tower in ("vision", "text"))
        if precision == "int8" and not self._compiled["vision"].get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE"):
            vision += " (int8 weights)"  # the plugin declined dynamic quantisation: float products
        self.effective_precision = vision if text == vision else f"{vision}; text {text}"
        self.version = ov.get_version()
        asked = {"fp32": "fp32", "bf16": "bf16", "int8": "int8+fp32; text fp32"}[precision]
        if self.effective_precision != asked:
            log.info("backend %s/%s runs %s on this CPU (OpenVINO %s)", name, precision, self.effective_precision,
                     self.version)

    def _run(self, tower: str, array: np.ndarray) -> np.ndarray:
        """Run one tower on an input the base class has checked."""
        requests = self._requests  # close() empties it: a closed backend raises below
        if tower not in requests:
            raise PickScoreError(f"this {self.name} backend is closed")
        spec = self.specs[tower]
        with self._locks[tower]:
            out = requests[tower].infer({spec.input.name: np.ascontiguousarray(array)})
            return np.array(out[spec.output.name], dtype=np.float32, copy=True)  # the request reuses its buffer

    def _infer_text(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run("text", input_ids)

    def _infer_images(self, pixel_values: Any) -> np.ndarray:
        return self._run("vision", pixel_values)

    def close(self) -> None:
        self._requests, self._compiled = {}, {}

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name}/{self.precision} (runs {self.effective_precision}) on {self.device}, "
                f"batch {self.batch_size}>")


def create(artifacts: Artifacts, name: str, precision: str, batch_size: int, threads: int | None = None) -> OpenVinoBackend:
    return OpenVinoBackend(artifacts, name, precision, batch_size, threads)
