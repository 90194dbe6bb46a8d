"""The one interface every inference engine implements, with a lifecycle and a seam for overlapping
host->device copies with compute; and the base class that checks every input once, against the towers'
declared IO, before a backend runs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..device_arrays import device_view, is_device_array
from ..errors import PickScoreError
from ..towers import TensorSpec, TowerSpec


class PendingEmbeddings(Protocol):
    def result(self) -> np.ndarray:
        """Block until the submitted batch is done; L2-normalised float32 [B, D] on the host."""


class Backend(Protocol):
    name: str  # a key of the registry: "onnx-cpu", "onnx-cuda", "tensorrt", "torch", "torch-cuda"
    precision: str  # "fp32" | "fp16" | "int8" | "bf16" (torch)
    device: str  # "cpu" | "cuda"
    batch_size: int  # images per vision call; callers split larger work
    queue_depth: int  # batches worth keeping submitted at once (1: submit_images computes before returning)

    def embed_text(self, input_ids: np.ndarray) -> np.ndarray:
        """int64 [B, T] -> L2-normalised float32 [B, D]. An input that does not fit (dtype, rank, shape,
        an empty batch) raises BackendInputError before anything runs."""

    def embed_images(self, pixel_values: Any) -> np.ndarray:
        """float32 [B, 3, S, S] (numpy; GPU backends also take an array on their device) -> float32 [B, D].
        Checked as embed_text's input is."""

    def submit_images(self, pixel_values: Any) -> PendingEmbeddings:
        """Start embedding a batch and return at once where the device allows: a GPU backend copies this
        batch to the device while the previous one computes. `result()` waits for it."""

    def synchronize(self) -> None:
        """Wait for all work queued on the device (a no-op on the CPU): benchmarks' clocks call it."""

    def close(self) -> None:
        """Release sessions, engines and device memory. Idempotent."""

    def __enter__(self) -> "Backend": ...

    def __exit__(self, *exc: object) -> None: ...


def effective_precision(backend: Any) -> str:
    """What a backend's kernels really run: its `effective_precision` where it can tell (OpenVINO drops a
    bf16 hint on a CPU without BF16 instructions and runs fp32), else the precision it was asked for."""
    return getattr(backend, "effective_precision", None) or backend.precision


class Done:
    """A PendingEmbeddings that is already finished."""

    def __init__(self, value: np.ndarray):
        self._value = value

    def result(self) -> np.ndarray:
        return self._value


class BackendInputError(PickScoreError, ValueError):
    """An input a backend refuses before running anything: its type, dtype, rank or shape does not fit the
    tower's declared input (towers.py), or the batch is empty. The message names the tensor and what is wrong."""


@dataclass(frozen=True)
class ArrayInfo:
    """What the input check reads of an array, numpy or not (a torch tensor, a device array): its shape and
    its dtype as numpy writes it."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def ndim(self) -> int:
        return len(self.shape)


def dtype_name(dtype: Any) -> str:
    """numpy's name for a dtype of numpy, CuPy, JAX or torch ("torch.float32" -> "float32"; a byte order
    other than the machine's stays visible: ">f4")."""
    try:
        return str(np.dtype(dtype))
    except TypeError:
        return str(dtype).rsplit(".", 1)[-1]


def array_info(x: Any) -> ArrayInfo:
    """`x`'s shape and dtype, read without copying or moving it (through the DLPack or CUDA array interface
    when it has no `shape` and `dtype` attributes)."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = device_view(x)
    return ArrayInfo(tuple(int(d) for d in x.shape), dtype_name(x.dtype))


def check_input(spec: TensorSpec, x: Any) -> None:
    """Raise BackendInputError unless `x` fits `spec`: dtype, rank, fixed dims, a batch of at least one row,
    and each dynamic axis in its declared range (the batch's upper bound included)."""
    info = array_info(x)
    if info.dtype != spec.dtype:
        raise BackendInputError(f"{spec.name}: expected dtype {spec.dtype}, got {info.dtype} (shape {info.shape})")
    if info.ndim == len(spec.shape) and info.shape[0] == 0:
        raise BackendInputError(f"{spec.name}: empty batch (shape {info.shape}): a backend call takes at least one row")
    try:
        spec.check(info)
    except ValueError as e:
        raise BackendInputError(str(e)) from None


class BackendBase:
    """What every backend shares (Polygraphy's BaseRunner): `embed_text`, `embed_images` and `submit_images`
    check their input once against the tower's declared IO (`check_input`), then call the backend's own
    `_infer_text`, `_infer_images` and `_submit_images`, which may assume a fitting input. A wrong input
    fails before anything runs, with the same error on every backend. Also: the lifecycle, and a synchronous
    `_submit_images` for backends that compute on the calling thread.

    A subclass sets `specs` (the tower specs it runs, usually `artifacts.specs()`) and implements `_infer_text`
    and `_infer_images` (or `_submit_images`, and `_infer_images` as its result); `_takes(tower, x)` says
    which inputs other than numpy arrays it accepts (by default: pixels already on its GPU)."""

    name: str
    precision: str
    device = "cpu"
    batch_size: int
    queue_depth = 1
    specs: dict[str, TowerSpec]

    # ---- checked entry points ---------------------------------------------------------------------
    def embed_text(self, input_ids: np.ndarray) -> np.ndarray:
        return self._infer_text(self._checked("text", input_ids))

    def embed_images(self, pixel_values: Any) -> np.ndarray:
        return self._infer_images(self._checked("vision", pixel_values))

    def submit_images(self, pixel_values: Any) -> PendingEmbeddings:
        return self._submit_images(self._checked("vision", pixel_values))

    def _checked(self, tower: str, x: Any) -> Any:
        spec = self.specs[tower].input
        if not isinstance(x, np.ndarray) and not self._takes(tower, x):
            raise BackendInputError(f"{spec.name}: expected a numpy array{self._also_takes(tower)}, got {type(x).__name__}")
        check_input(spec, x)
        return x

    def _takes(self, tower: str, x: Any) -> bool:
        """Whether this backend takes `x`, which is not a numpy array, as it is: by default pixels already on
        its GPU (bound in place)."""
        return tower == "vision" and self.device == "cuda" and is_device_array(x)

    def _also_takes(self, tower: str) -> str:
        """What else `_takes` accepts, for the error message."""
        if tower == "vision" and self.device == "cuda":
            return " (or an array on the GPU: __dlpack__ / __cuda_array_interface__)"
        return ""

    # ---- what each backend implements -------------------------------------------------------------
    def _infer_text(self, input_ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _infer_images(self, pixel_values: Any) -> np.ndarray:
        raise NotImplementedError

    def _submit_images(self, pixel_values: Any) -> PendingEmbeddings:
        return Done(self._infer_images(pixel_values))

    # ---- lifecycle --------------------------------------------------------------------------------
    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "BackendBase":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}/{self.precision} on {self.device}, batch {self.batch_size}>"
