"""ONNX Runtime backends: `onnx-cpu` and `onnx-cuda` differ only in execution providers."""

from __future__ import annotations

import os

import numpy as np

from ..artifacts import Artifacts
from ..errors import BackendUnavailableError
from ..towers import TowerSpec

PROVIDERS = {
    "onnx-cpu": ["CPUExecutionProvider"],
    "onnx-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
# Batches the vision tower gets per call; bigger buys nothing on a CPU and costs memory.
DEFAULT_MAX_BATCH = {"onnx-cpu": 8, "onnx-cuda": 64}


def available_providers() -> list[str]:
    import onnxruntime

    return onnxruntime.get_available_providers()


def session_options(threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or int(os.environ.get("PICKSCORE_THREADS", 0)) or 0
    # ORT's own graph fusions are on; `pickscore verify` gates exactly this session configuration.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


class OnnxRuntimeBackend:
    def __init__(self, artifacts: Artifacts, name: str, precision: str, threads: int | None = None,
                 max_batch: int | None = None):
        import onnxruntime as ort

        if name not in PROVIDERS:
            raise ValueError(f"unknown ONNX Runtime backend {name!r}; known: {sorted(PROVIDERS)}")
        if PROVIDERS[name][0] not in ort.get_available_providers():
            raise BackendUnavailableError(
                f"backend {name} needs {PROVIDERS[name][0]}, which this onnxruntime build lacks "
                f"(has: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu or use --backend onnx-cpu"
            )
        self.name, self.precision = name, precision
        self.max_batch = max_batch or DEFAULT_MAX_BATCH[name]
        self._specs = artifacts.specs()
        options = session_options(threads)
        self._sessions = {
            tower: ort.InferenceSession(str(artifacts.tower_file(tower, precision)), options, providers=PROVIDERS[name])
            for tower in ("text", "vision")
        }

    def _run(self, tower: str, array: np.ndarray) -> np.ndarray:
        spec: TowerSpec = self._specs[tower]
        spec.input.check(array)
        (out,) = self._sessions[tower].run([spec.output.name], {spec.input.name: array})
        return out

    def embed_text(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run("text", input_ids)

    def embed_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._run("vision", pixel_values)
