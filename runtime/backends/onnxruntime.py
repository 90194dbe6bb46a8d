"""ONNX Runtime backends: `onnx-cpu` and `onnx-cuda` differ only in execution providers."""

from __future__ import annotations

import os

import numpy as np

from ..artifacts import Artifacts
from ..errors import BackendUnavailableError
from ..towers import TOWERS
from .base import BackendBase

PROVIDERS = {
    "onnx-cpu": ["CPUExecutionProvider"],
    "onnx-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def available_providers() -> list[str]:
    import onnxruntime

    return onnxruntime.get_available_providers()


def cuda_provider_missing() -> str | None:
    """Why onnx-cuda cannot run here, or None."""
    have = available_providers()
    if "CUDAExecutionProvider" in have:
        return None
    return f"this onnxruntime build has no CUDAExecutionProvider (has: {', '.join(have)})"


def session_options(threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or int(os.environ.get("PICKSCORE_THREADS", 0)) or 0
    # ORT's own graph fusions are on; `pickscore verify` gates exactly this session configuration.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


class OnnxRuntimeBackend(BackendBase):
    def __init__(self, artifacts: Artifacts, name: str, precision: str, batch_size: int, threads: int | None = None):
        import onnxruntime as ort

        if name not in PROVIDERS:
            raise ValueError(f"unknown ONNX Runtime backend {name!r}; known: {sorted(PROVIDERS)}")
        if PROVIDERS[name][0] not in ort.get_available_providers():
            raise BackendUnavailableError(f"backend {name}: {cuda_provider_missing()}; on an NVIDIA machine install the "
                                          "[gpu] extra (onnxruntime-gpu, which replaces onnxruntime)")
        self.name, self.precision, self.batch_size = name, precision, batch_size
        self.device = "cuda" if name == "onnx-cuda" else "cpu"
        self._specs = artifacts.specs()
        options = session_options(threads)
        self._sessions = {tower: ort.InferenceSession(str(artifacts.tower_file(tower, precision)), options,
                                                      providers=PROVIDERS[name]) for tower in TOWERS}

    def _run(self, tower: str, array: np.ndarray) -> np.ndarray:
        spec = self._specs[tower]
        spec.input.check(array)
        (out,) = self._sessions[tower].run([spec.output.name], {spec.input.name: array})
        return out

    def embed_text(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run("text", input_ids)

    def embed_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._run("vision", np.asarray(pixel_values))

    def close(self) -> None:
        self._sessions = {}


def create(artifacts: Artifacts, name: str, precision: str, batch_size: int, threads: int | None = None,
                 **_: object) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(artifacts, name, precision, batch_size, threads)
