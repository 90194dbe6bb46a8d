"""ONNX Runtime backends: `onnx-cpu` and `onnx-cuda` run the same sessions with other execution providers.

`onnx-cpu` calls `session.run`. `onnx-cuda` runs through I/O binding (onnxruntime_io): the input goes to
the GPU once, or is bound in place when it is already a device array, and the embeddings come back
once; with `cuda_graphs=True` the vision tower replays CUDA graphs over bucketed batch sizes. TF32 is
off on the GPU: fp32 means fp32, as in the reference."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..artifacts import Artifacts
from ..device_arrays import device_view, is_device_array
from ..errors import BackendUnavailableError
from ..optional import require_onnxruntime
from ..ort_sessions import session_options
from ..towers import TOWERS
from .base import BackendBase
from .onnxruntime_io import BoundRunner, BucketedRunner, GraphRunner, default_buckets

PROVIDERS = {
    "onnx-cpu": ["CPUExecutionProvider"],
    "onnx-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def available_providers() -> list[str]:
    return require_onnxruntime().get_available_providers()


def cuda_provider_missing() -> str | None:
    """Why onnx-cuda cannot run here, or None."""
    have = available_providers()
    if "CUDAExecutionProvider" in have:
        return None
    return (f"this onnxruntime build has no CUDAExecutionProvider (has: {', '.join(have)}); replace it with the GPU "
            "build: pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'pickscore-runtime[gpu]' (both wheels "
            "provide the same module, so only one may be installed)")


def providers(name: str, cuda_graph: bool = False, device_id: int = 0) -> list:
    if name == "onnx-cpu":
        return PROVIDERS[name]
    cuda = {"device_id": str(device_id), "use_tf32": "0"}
    if cuda_graph:
        cuda["enable_cuda_graph"] = "1"
    return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]


class OnnxRuntimeBackend(BackendBase):
    def __init__(self, artifacts: Artifacts, name: str, precision: str, batch_size: int, threads: int | None = None,
                 cuda_graphs: bool = False, graph_buckets: tuple[int, ...] | None = None):
        ort = require_onnxruntime(f"backend {name}")  # MissingExtraError naming [cpu] and [gpu]
        if name not in PROVIDERS:
            raise ValueError(f"unknown ONNX Runtime backend {name!r}; known: {sorted(PROVIDERS)}")
        if PROVIDERS[name][0] not in ort.get_available_providers():
            raise BackendUnavailableError(f"backend {name}: {cuda_provider_missing()}")
        self.name, self.precision, self.batch_size = name, precision, batch_size
        self.device = "cuda" if name == "onnx-cuda" else "cpu"
        self.specs = artifacts.specs()
        options = session_options(threads)
        self._sessions = {tower: ort.InferenceSession(str(artifacts.tower_file(tower, precision)), options,
                                                      providers=providers(name)) for tower in TOWERS}
        self._runners = {}  # onnx-cuda: I/O binding; onnx-cpu runs the sessions as they are
        if self.device == "cuda":
            self._runners = {t: BoundRunner(self._sessions[t], self.specs[t], "cuda") for t in TOWERS}
            if cuda_graphs:
                vision = str(artifacts.tower_file("vision", precision))
                axis = self.specs["vision"].input.dynamic_axes()[0]

                def bucket_session(batch: int):
                    fixed = session_options(threads)
                    fixed.add_free_dimension_override_by_name(axis, batch)
                    return ort.InferenceSession(vision, fixed, providers=providers(name, cuda_graph=True))

                buckets = BucketedRunner(bucket_session, self.specs["vision"], graph_buckets or default_buckets(batch_size), "cuda")
                self._runners["vision"] = GraphRunner(buckets, self._runners["vision"])

    def _run(self, tower: str, array: Any) -> np.ndarray:
        """Run one tower on an input the base class has checked."""
        if tower in self._runners:
            return self._runners[tower].run(array)
        spec = self.specs[tower]
        (out,) = self._sessions[tower].run([spec.output.name], {spec.input.name: array})
        return out

    def _infer_text(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run("text", input_ids)

    def _infer_images(self, pixel_values: Any) -> np.ndarray:
        if is_device_array(pixel_values):  # only onnx-cuda takes them (BackendBase._takes)
            # bound in place; like any I/O binding, the producer must have finished writing it
            return self._run("vision", device_view(pixel_values))
        return self._run("vision", pixel_values)

    def close(self) -> None:
        self._sessions, self._runners = {}, {}


def create(artifacts: Artifacts, name: str, precision: str, batch_size: int, threads: int | None = None,
           cuda_graphs: bool = False, graph_buckets: tuple[int, ...] | None = None) -> OnnxRuntimeBackend:
    """cuda_graphs (onnx-cuda): replay CUDA graphs for the vision tower, one fixed-shape session per
    batch bucket (graph_buckets; default 1, 8 and batch_size), each holding its own copy of the weights."""
    return OnnxRuntimeBackend(artifacts, name, precision, batch_size, threads, cuda_graphs, graph_buckets)
