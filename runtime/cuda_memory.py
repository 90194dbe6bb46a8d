"""CUDA through cuda-python's runtime bindings (`cuda.bindings.runtime`), without torch: device and
pinned host buffers, streams, events and CUDA graphs, each a small object with an idempotent `free()`.

Imported only by the GPU code that needs it (the tensorrt backend and engine builds); a missing
cuda-python (or one too old to have `cuda.bindings`) raises MissingExtraError naming the [tensorrt]
extra, and a machine without a usable NVIDIA driver or device raises BackendUnavailableError saying so,
whether the bindings report that with an error code or raise while loading the driver library.

The public surface, also what benchmarks/gpu's torch-free smoke check drives: `current_device()`,
`memory_in_use_mb()`, `DeviceBuffer(nbytes)`, `PinnedArray(shape, dtype)` (`.array`, `.view(shape)`),
`Stream()` (`copy_to_device`, `copy_to_host`, `wait(event)`, `wait_for_stream(handle)`, `synchronize`),
`Event(timing=False)` (`record(stream)`, `synchronize`, `seconds_since(start)`), `Graph(stream, enqueue)`
(`launch(stream)`), all with `free()`; and `call(fn, *args)` for any other `cuda.bindings` function.
Not run on a GPU yet.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from .errors import BackendUnavailableError, MissingExtraError, PickScoreError
from .optional import findable, require

# cudaError_t names that mean "no usable GPU here" rather than a failure of the work itself
NO_DEVICE = {"cudaErrorInsufficientDriver", "cudaErrorNoDevice", "cudaErrorInvalidDevice", "cudaErrorDevicesUnavailable",
             "cudaErrorSystemDriverMismatch", "cudaErrorCompatNotSupportedOnDevice", "cudaErrorStubLibrary",
             "cudaErrorCallRequiresNewerDriver", "cudaErrorSystemNotReady"}
BINDINGS = "CUDA buffers for the GPU backends (cuda-python)"


class CudaError(PickScoreError):
    """A CUDA call failed (out of memory, an illegal access, ...)."""


_RUNTIME: ModuleType | None = None


def cudart() -> ModuleType:
    """cuda-python's runtime API module."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = load_bindings()
    return _RUNTIME


def load_bindings() -> ModuleType:
    try:
        return require("cuda.bindings.runtime", BINDINGS, extra="tensorrt")
    except MissingExtraError:
        if "cuda" in sys.modules and not findable("cuda.bindings"):  # cuda-python 12.6.0 or older, or only
            raise MissingExtraError(BINDINGS, "cuda-python>=12.6.1", "tensorrt",  # cuda-pathfinder / cuda-core
                                    "the installed cuda-python has no cuda.bindings: upgrade it") from None
        raise
    except (RuntimeError, OSError) as e:  # some releases load the driver library at import
        raise BackendUnavailableError(f"CUDA cannot run here: cuda.bindings could not load ({e})") from e


def function_name(fn: Any) -> str:
    return getattr(fn, "__name__", repr(fn))


def invoke(fn: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """`fn(*args)`, with the bindings' failure to load the NVIDIA driver library (a RuntimeError, as
    cuda-bindings raise it instead of returning an error code when there is no driver) made our error."""
    try:
        return fn(*args)
    except RuntimeError as e:
        text = f"{type(e).__name__}: {e}"
        if "dlopen" in text or "DynamicLib" in text or "libcuda" in text or "driver" in text.lower():
            raise BackendUnavailableError(f"CUDA cannot run here: {function_name(fn)}: cuda-bindings could not load "
                                          f"the NVIDIA driver library ({text}); is an NVIDIA driver installed?") from e
        raise CudaError(f"{function_name(fn)}: {text}") from e


def failure(fn: Any, err: Any) -> PickScoreError:
    """The error to raise for a cudaError_t that is not cudaSuccess."""
    name = getattr(err, "name", str(err))
    message = f"{function_name(fn)}: {name} ({error_text(err)})"
    if name in NO_DEVICE:
        return BackendUnavailableError(f"CUDA cannot run here: {message}{driver_note()}")
    return CudaError(message)


def error_text(err: Any) -> str:
    try:
        text = cudart().cudaGetErrorString(err)[1]
    except Exception:  # noqa: BLE001 - the error's name is enough
        return "no description"
    return text.decode() if isinstance(text, bytes) else str(text)


def driver_note() -> str:
    """Why a "no usable GPU" error happened, where the versions tell: no driver at all, or a driver older
    than the CUDA these bindings were built for (cuda-bindings 13 on an R550/R570 driver)."""
    try:
        rt = cudart()
        driver, runtime = invoke(rt.cudaDriverGetVersion, ())[1], invoke(rt.cudaRuntimeGetVersion, ())[1]
    except Exception:  # noqa: BLE001 - the error itself is reported either way
        return ""
    if not driver:
        return "; no NVIDIA driver is loaded on this machine"
    if driver < runtime:
        return (f"; the NVIDIA driver supports CUDA {driver // 1000}.{driver % 1000 // 10}, these cuda-bindings are "
                f"for CUDA {runtime // 1000}.{runtime % 1000 // 10}: install cuda-python {driver // 1000}.x "
                f"(the [tensorrt] extra's variant for that driver) or a newer driver")
    return ""


def call(fn: Any, *args: Any) -> Any:
    """Call a cuda.bindings function (they return (error, *values)); raise on error, return the values."""
    err, *values = invoke(fn, args)
    if int(err) != 0:
        raise failure(fn, err)
    return values[0] if len(values) == 1 else tuple(values) if values else None


def free_all(*things: Any) -> None:
    """free() each (None skipped), going on past failures; the first failure is raised at the end."""
    first = None
    for thing in things:
        try:
            if thing is not None:
                thing.free()
        except Exception as e:  # noqa: BLE001 - release everything we can, then report
            first = first or e
    if first is not None:
        raise first


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: str
    total_memory: int


def current_device() -> DeviceInfo:
    """The device this process's CUDA work goes to (the first visible one unless set otherwise)."""
    rt = cudart()
    index = call(rt.cudaGetDevice)
    props = call(rt.cudaGetDeviceProperties, index)
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(index, name.split("\x00")[0].strip(), f"{props.major}.{props.minor}", int(props.totalGlobalMem))


def memory_in_use_mb() -> float:
    """Device memory in use on the current device (every process's), in MiB."""
    free, total = call(cudart().cudaMemGetInfo)
    return (total - free) / 2**20


class DeviceBuffer:
    """`nbytes` of device memory."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr: int = int(call(cudart().cudaMalloc, self.nbytes))

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            call(cudart().cudaFree, ptr)


class PinnedArray:
    """A numpy array in page-locked host memory, which the GPU copies from and to asynchronously."""

    def __init__(self, shape: tuple[int, ...], dtype: Any):
        dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * dtype.itemsize
        self.ptr: int = int(call(cudart().cudaMallocHost, self.nbytes))
        raw = (ctypes.c_byte * self.nbytes).from_address(self.ptr)
        self.array: np.ndarray = np.frombuffer(raw, dtype=dtype).reshape(shape)

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        """The first prod(shape) elements as an array of `shape` (contiguous, for a smaller batch)."""
        return self.array.reshape(-1)[: int(np.prod(shape))].reshape(shape)

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self.array = np.empty(0, self.array.dtype)  # no view may outlive the memory
            call(cudart().cudaFreeHost, ptr)


class Stream:
    def __init__(self) -> None:
        rt = cudart()
        self._stream = call(rt.cudaStreamCreateWithFlags, rt.cudaStreamNonBlocking)
        self.handle: int = int(self._stream)

    def wait(self, event: "Event") -> None:
        call(cudart().cudaStreamWaitEvent, self._stream, event.event, 0)

    def wait_for_stream(self, handle: int) -> None:
        """Order this stream after the work queued so far on another stream (given by its handle; 1 and 2
        are CUDA's legacy and per-thread default streams)."""
        rt = cudart()
        event = Event()
        try:
            call(rt.cudaEventRecord, event.event, handle)
            self.wait(event)
        finally:
            event.free()  # safe: the wait is already queued

    def synchronize(self) -> None:
        if self.handle:
            call(cudart().cudaStreamSynchronize, self._stream)

    def copy_to_device(self, dst: int, src: int, nbytes: int) -> None:
        rt = cudart()
        call(rt.cudaMemcpyAsync, dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream)

    def copy_to_host(self, dst: int, src: int, nbytes: int) -> None:
        rt = cudart()
        call(rt.cudaMemcpyAsync, dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream)

    def free(self) -> None:
        if self.handle:
            self.handle = 0
            call(cudart().cudaStreamDestroy, self._stream)


class Event:
    def __init__(self, timing: bool = False) -> None:
        rt = cudart()
        self.event = call(rt.cudaEventCreateWithFlags, rt.cudaEventDefault if timing else rt.cudaEventDisableTiming)
        self._live = True

    def record(self, stream: Stream) -> None:
        call(cudart().cudaEventRecord, self.event, stream._stream)

    def synchronize(self) -> None:
        call(cudart().cudaEventSynchronize, self.event)

    def seconds_since(self, start: "Event") -> float:
        return call(cudart().cudaEventElapsedTime, start.event, self.event) / 1000

    def free(self) -> None:
        if self._live:
            self._live = False
            call(cudart().cudaEventDestroy, self.event)


class Graph:
    """A CUDA graph captured from the work `enqueue(stream)` puts on `stream`, replayed by `launch`:
    one launch instead of one per kernel, for small batches whose launches cost more than their math.
    The captured work keeps the shapes and addresses it was captured with.

    A capture that fails ends capture mode and destroys whatever it had captured, and raises the error of
    the step that failed (the enqueue's, not the invalidated capture's that follows from it)."""

    def __init__(self, stream: Stream, enqueue: Any):
        rt = cudart()
        self._exec = None
        call(rt.cudaStreamBeginCapture, stream._stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        try:
            enqueue(stream)
        except BaseException:
            with contextlib.suppress(Exception):  # the enqueue's error is the one to report
                destroy_graph(end_capture(stream))
            raise
        graph = end_capture(stream)
        try:
            self._exec = call(rt.cudaGraphInstantiate, graph, 0)
        except BaseException:
            with contextlib.suppress(Exception):  # the instantiation's error is the one to report
                destroy_graph(graph)
            raise
        try:
            destroy_graph(graph)  # the executable graph keeps what it needs
        except BaseException:
            self.free()
            raise

    def launch(self, stream: Stream) -> None:
        call(cudart().cudaGraphLaunch, self._exec, stream._stream)

    def free(self) -> None:
        if self._exec is not None:
            exec_, self._exec = self._exec, None
            call(cudart().cudaGraphExecDestroy, exec_)


def end_capture(stream: Stream) -> Any:
    """End capture mode on `stream` and return the captured graph; on failure raise, after destroying any
    partial graph the failed capture returned."""
    rt = cudart()
    err, graph = invoke(rt.cudaStreamEndCapture, (stream._stream,))
    if int(err) != 0:
        with contextlib.suppress(Exception):
            destroy_graph(graph)
        raise failure(rt.cudaStreamEndCapture, err)
    return graph


def destroy_graph(graph: Any) -> None:
    if graph is not None and int(graph):
        call(cudart().cudaGraphDestroy, graph)
