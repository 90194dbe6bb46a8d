"""ONNX Runtime backends: `onnx-cpu` and `onnx-cuda` run the same sessions with other execution providers.

`onnx-cpu` calls `session.run`. `onnx-cuda` runs through I/O binding (onnxruntime_io): the input goes to
the GPU once, or is bound in place when it is already a device array, and the embeddings come back
once; with `cuda_graphs=True` the vision tower replays CUDA graphs over bucketed batch sizes. TF32 is
off on the GPU: fp32 means fp32, as in the reference; the CUDA EP's `use_tf32` option that says so came
in onnxruntime-gpu 1.18, so older ones are refused. Every session is checked to run on the provider asked
for: ONNX Runtime falls back to the CPU with only a warning when the CUDA or cuDNN libraries do not load,
and a "GPU" figure would then be a CPU one."""

from __future__ import annotations

import re
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
CUDA_MIN_VERSION = (1, 18)  # the first onnxruntime-gpu with the CUDA EP's use_tf32 option


def available_providers() -> list[str]:
    return require_onnxruntime().get_available_providers()


def version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "1.18.0" or "1.19.0.dev20240501"."""
    major, minor = (int(part) for part in re.findall(r"\d+", version)[:2])
    return major, minor


def cuda_provider_missing() -> str | None:
    """Why onnx-cuda cannot run here, or None."""
    have = available_providers()
    if "CUDAExecutionProvider" not in have:
        return (f"this onnxruntime build has no CUDAExecutionProvider (has: {', '.join(have)}); replace it with the GPU "
                "build: pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'pickscore-runtime[gpu]' (both wheels "
                "provide the same module, so only one may be installed)")
    version = require_onnxruntime().__version__
    if version_tuple(version) < CUDA_MIN_VERSION:
        return (f"onnxruntime-gpu {version} predates 1.18, the first whose CUDA EP takes use_tf32=0 (without it "
                "fp32 runs as TF32 on Ampere and newer GPUs): pip install -U 'onnxruntime-gpu>=1.18'")
    return None


def provider_name(provider: str | tuple[str, dict]) -> str:
    return provider if isinstance(provider, str) else provider[0]


def checked_session(ort: Any, model: str, options: Any, wanted: list) -> Any:
    """An InferenceSession that runs on the first of the `wanted` providers, else BackendUnavailableError:
    ONNX Runtime falls back to the next one (the CPU) with only a warning when a provider cannot be used
    (for the CUDA EP: CUDA or cuDNN libraries that do not load, or do not match the build)."""
    session = ort.InferenceSession(model, options, providers=wanted)
    want, got = provider_name(wanted[0]), session.get_providers()
    if not got or got[0] != want:
        raise BackendUnavailableError(
            f"ONNX Runtime was asked for {want} and runs the session on {', '.join(got) or 'nothing'} instead: the "
            "provider did not load (for CUDA: the CUDA and cuDNN libraries this onnxruntime-gpu was built for are "
            "missing or do not match; ONNX Runtime's message above names the library). Requirements: "
            "https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements")
    return session


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
        if name == "onnx-cuda" and (missing := cuda_provider_missing()):
            raise BackendUnavailableError(f"backend {name}: {missing}")
        self.name, self.precision, self.batch_size = name, precision, batch_size
        self.device = "cuda" if name == "onnx-cuda" else "cpu"
        self.specs = artifacts.specs()
        options = session_options(threads)
        self._sessions = {tower: checked_session(ort, str(artifacts.tower_file(tower, precision)), options,
                                                 providers(name)) for tower in TOWERS}
        self._runners = {}  # onnx-cuda: I/O binding; onnx-cpu runs the sessions as they are
        if self.device == "cuda":
            self._runners = {t: BoundRunner(self._sessions[t], self.specs[t], "cuda") for t in TOWERS}
            if cuda_graphs:
                vision = str(artifacts.tower_file("vision", precision))
                axis = self.specs["vision"].input.dynamic_axes()[0]

                def bucket_session(batch: int):
                    fixed = session_options(threads)
                    fixed.add_free_dimension_override_by_name(axis, batch)
                    return checked_session(ort, vision, fixed, providers(name, cuda_graph=True))

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
            # bound in place, after the producer's pending writes (BoundRunner.run)
            return self._run("vision", device_view(pixel_values))
        return self._run("vision", pixel_values)

    def close(self) -> None:
        self._sessions, self._runners = {}, {}


def create(artifacts: Artifacts, name: str, precision: str, batch_size: int, threads: int | None = None,
           cuda_graphs: bool = False, graph_buckets: tuple[int, ...] | None = None) -> OnnxRuntimeBackend:
    """cuda_graphs (onnx-cuda): replay CUDA graphs for the vision tower, one fixed-shape session per
    batch bucket (graph_buckets; default 1, 8 and batch_size), each holding its own copy of the weights."""
    return OnnxRuntimeBackend(artifacts, name, precision, batch_size, threads, cuda_graphs, graph_buckets)
