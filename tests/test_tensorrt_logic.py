"""The tensorrt backend's own logic and the CUDA layer under it, on the CPU: the backend and
`cuda_memory` run for real over a fake CUDA runtime (standing for `cuda.bindings.runtime`: memory is
host memory, streams run their work at once or record it while capturing, graphs replay what they
recorded) and fake TensorRT engines (whose kernel reads the shape and addresses from its execution
context when it runs, as TensorRT's kernels read per-context state). Also the CUDA layer's errors with
the real cuda-bindings on this machine, and the backend's probe."""

from __future__ import annotations

import ctypes
import enum
import importlib.util
import itertools
import os
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

import pickscore_runtime.backends.tensorrt as trt_backend
import pickscore_runtime.cuda_memory as cuda_memory
from pickscore_runtime.backends import BACKENDS
from pickscore_runtime.cuda_memory import CudaError, Graph, Stream, call, current_device
from pickscore_runtime.engines.contexts import TowerEngine
from pickscore_runtime.errors import BackendUnavailableError, PickScoreError
from pickscore_runtime.towers import tower_specs

SPECS = tower_specs(embed_dim=4, image_size=32)
MAX_BATCH = 8


class Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901
    cudaErrorStreamCaptureIsolation = 905
    cudaErrorInvalidValue = 1
    cudaErrorInsufficientDriver = 35


OK = Err.cudaSuccess
H2D, D2H = 1, 2


class FakeStream:
    def __init__(self, handle: int):
        self.handle, self.capture, self.invalidated = handle, None, False

    def __int__(self) -> int:
        return self.handle


class FakeGraph:
    ids = itertools.count(1)

    def __init__(self, ops: list):
        self.ops, self.id = list(ops), next(FakeGraph.ids)

    def __int__(self) -> int:
        return self.id


class FakeCuda:
    """The part of cuda.bindings.runtime that cuda_memory uses. The device is synchronous: work runs when
    it is enqueued, unless its stream is capturing, when it is recorded into the graph instead."""

    cudaStreamNonBlocking, cudaEventDefault, cudaEventDisableTiming = 1, 0, 2
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=H2D, cudaMemcpyDeviceToHost=D2H)
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)

    def __init__(self):
        self.memory, self.streams, self.copies = {}, {}, Counter()
        self.graphs, self.execs, self.launches = set(), set(), 0
        self.handles = itertools.count(0x100)
        self.end_capture_gives = None  # (error, keep the partial graph): how the next cudaStreamEndCapture fails

    def stream(self, s) -> FakeStream:
        return self.streams[int(s)]

    def enqueue(self, s, op) -> None:
        stream = self.stream(s)
        if stream.capture is not None:
            stream.capture.append(op)
        else:
            op()

    def cudaMalloc(self, n):
        buf = (ctypes.c_byte * n)()
        self.memory[ctypes.addressof(buf)] = buf
        return OK, ctypes.addressof(buf)

    cudaMallocHost = cudaMalloc

    def cudaFree(self, ptr):
        del self.memory[ptr]
        return (OK,)

    cudaFreeHost = cudaFree

    def cudaStreamCreateWithFlags(self, flags):
        stream = FakeStream(next(self.handles))
        self.streams[stream.handle] = stream
        return OK, stream

    def cudaStreamDestroy(self, s):
        del self.streams[int(s)]
        return (OK,)

    def cudaStreamSynchronize(self, s):
        stream = self.stream(s)
        if stream.capture is not None:  # as CUDA: illegal during capture, and it invalidates the capture
            stream.invalidated = True
            return (Err.cudaErrorStreamCaptureUnsupported,)
        return (OK,)

    def cudaMemcpyAsync(self, dst, src, n, kind, s):
        self.copies[kind] += 1
        self.enqueue(s, lambda: ctypes.memmove(dst, src, n))
        return (OK,)

    def cudaEventCreateWithFlags(self, flags):
        return OK, object()

    def cudaEventRecord(self, event, s):
        self.enqueue(s, lambda: None)
        return (OK,)

    def cudaEventSynchronize(self, event):
        return (OK,)

    def cudaStreamWaitEvent(self, s, event, flags):
        stream = self.stream(s)
        if stream.capture is not None:  # an event from outside the capture: CUDA refuses it, invalidating the capture
            stream.invalidated = True
            return (Err.cudaErrorStreamCaptureIsolation,)
        return (OK,)

    def cudaEventDestroy(self, event):
        return (OK,)

    def cudaStreamBeginCapture(self, s, mode):
        stream = self.stream(s)
        stream.capture, stream.invalidated = [], False
        return (OK,)

    def cudaStreamEndCapture(self, s):
        stream = self.stream(s)
        ops, stream.capture = stream.capture, None
        error, partial = self.end_capture_gives or ((Err.cudaErrorStreamCaptureInvalidated, False) if stream.invalidated
                                                    else (OK, True))
        self.end_capture_gives = None
        graph = FakeGraph(ops) if partial else None
        if graph is not None:
            self.graphs.add(graph)
        return error, graph

    def cudaGraphInstantiate(self, graph, flags):
        executable = FakeGraph(graph.ops)
        self.execs.add(executable)
        return OK, executable

    def cudaGraphLaunch(self, executable, s):
        assert executable in self.execs
        self.launches += 1
        self.enqueue(s, lambda: [op() for op in executable.ops])
        return (OK,)

    def cudaGraphDestroy(self, graph):
        self.graphs.remove(graph)
        return (OK,)

    def cudaGraphExecDestroy(self, executable):
        self.execs.remove(executable)
        return (OK,)

    def cudaGetErrorString(self, err):
        return OK, f"fake {err.name}".encode()

    def cudaGetDevice(self):
        return OK, 0

    def cudaGetDeviceProperties(self, index):
        return OK, SimpleNamespace(name=b"Fake GPU", major=9, minor=0, totalGlobalMem=80 << 30)


FakeTensorRT = SimpleNamespace(ExecutionContextAllocationStrategy=SimpleNamespace(STATIC=0, USER_MANAGED=2),
                               nptype=np.dtype)


def array_at(ptr: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    raw = (ctypes.c_byte * (int(np.prod(shape)) * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def embedding(x: np.ndarray) -> np.ndarray:
    """What the fake engines compute: row i is (the sum of input row i) + the column index."""
    return x.reshape(len(x), -1).sum(axis=1)[:, None] + np.arange(4, dtype=np.float32)


class FakeEngine:
    def __init__(self, cuda: FakeCuda, tower: str):
        self.cuda, self.spec = cuda, SPECS[tower]
        self.max_shape = (MAX_BATCH, 77) if tower == "text" else (MAX_BATCH, 3, 32, 32)
        self.device_memory_size_v2 = 1 << 12
        self.contexts: list[FakeContext] = []
        self.runs: list[tuple[int, int]] = []  # (device memory, stream handle) of each enqueue
        self.fail_capture = False  # execute_async_v3 returns False while the stream is capturing
        self.capturing = threading.Event()  # set when a capture reaches execute_async_v3
        self.hold_capture: threading.Event | None = None  # the capture waits for it there

    def get_tensor_dtype(self, name):
        return self.spec.input.dtype if name == self.spec.input.name else self.spec.output.dtype

    def get_tensor_profile_shape(self, name, profile):
        return (1, *self.max_shape[1:]), self.max_shape, self.max_shape

    def create_execution_context(self, strategy):
        self.contexts.append(FakeContext(self, strategy))
        return self.contexts[-1]


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy):
        self.engine, self.strategy = engine, strategy
        self.memory = self.shape = self.captured_shape = None
        self.addresses: dict[str, int] = {}
        self.shapes_after_capture: list[tuple[int, ...]] = []

    def set_device_memory(self, ptr, size):
        assert size >= self.engine.device_memory_size_v2
        self.memory = ptr

    def set_input_shape(self, name, shape):
        if self.captured_shape is not None:
            self.shapes_after_capture.append(tuple(shape))
        self.shape = tuple(shape)
        return shape[0] <= self.engine.max_shape[0]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, handle):
        assert self.strategy == FakeTensorRT.ExecutionContextAllocationStrategy.USER_MANAGED and self.memory
        engine = self.engine
        if engine.cuda.stream(handle).capture is not None:
            engine.capturing.set()
            if engine.hold_capture is not None:
                assert engine.hold_capture.wait(10)
            if engine.fail_capture:
                return False
            self.captured_shape = self.shape
        engine.runs.append((self.memory, handle))
        engine.cuda.enqueue(handle, self.kernel)
        return True

    def kernel(self) -> None:
        """Runs when its stream reaches it, or each time a graph holding it is replayed: it reads the
        context's shape and addresses then, not when it was enqueued."""
        spec, n = self.engine.spec, self.shape[0]
        x = array_at(self.addresses[spec.input.name], self.shape, spec.input.dtype)
        array_at(self.addresses[spec.output.name], (n, 4), np.float32)[...] = embedding(x)


@pytest.fixture
def fake(monkeypatch):
    """A fake CUDA runtime and TensorRT under the real backend: `fake.open(**options)` makes a backend."""
    cuda = FakeCuda()
    engines = {tower: FakeEngine(cuda, tower) for tower in SPECS}

    def open_engines(trt, artifacts, specs, *args):
        return object(), {t: TowerEngine(trt, e, specs[t], f"fake {t}") for t, e in engines.items()}, {}

    monkeypatch.setattr(cuda_memory, "cudart", lambda: cuda)
    monkeypatch.setattr(trt_backend, "cudart", lambda: cuda)
    monkeypatch.setattr(trt_backend, "load_tensorrt", lambda feature: FakeTensorRT)
    monkeypatch.setattr(trt_backend, "open_engines", open_engines)
    opened = []

    def open_backend(**options):
        opened.append(trt_backend.TensorRTBackend(SimpleNamespace(specs=lambda: SPECS), "fp16", MAX_BATCH, **options))
        return opened[-1]

    yield SimpleNamespace(cuda=cuda, engines=engines, open=open_backend)
    for backend in opened:
        backend.close()
    assert not cuda.memory and not cuda.streams and not cuda.graphs and not cuda.execs  # everything freed


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


# ---- 1: one execution context per captured graph, sharing one memory block on one stream ---------------
def test_each_cuda_graph_replays_on_a_context_that_never_runs_another_shape(fake):
    backend = fake.open(cuda_graphs=True)
    for round_ in range(3):  # new pixels each round: a replay that reads stale state cannot pass for right
        x = pixels(MAX_BATCH, seed=round_)
        for n in (1, 3, 8, 2, 3):  # odd: the next round puts each size in the other slot
            np.testing.assert_array_equal(backend.embed_images(x[:n]), embedding(x[:n]))
    vision = fake.engines["vision"]
    captured = [c for c in vision.contexts if c.captured_shape is not None]
    assert sorted(c.captured_shape[0] for c in captured) == [1, 1, 2, 2, 3, 3, 8, 8]  # (slot, batch) pairs
    assert all(c.shapes_after_capture == [] for c in captured)
    assert fake.cuda.launches > 0
    # every context of the engine draws on one memory block, and runs only on the compute stream
    assert len({c.memory for c in vision.contexts}) == 1 and len({handle for _, handle in vision.runs}) == 1


def test_without_graphs_one_context_runs_every_shape_and_device_arrays_never_capture(fake):
    backend = fake.open()
    x = pixels(MAX_BATCH)
    for n in (1, 5, 8):
        np.testing.assert_array_equal(backend.embed_images(x[:n]), embedding(x[:n]))
    assert len(fake.engines["vision"].contexts) == 1 and fake.cuda.launches == 0


def test_a_failed_capture_falls_back_to_eager_runs_with_the_right_numbers(fake, caplog):
    fake.engines["vision"].fail_capture = True
    backend = fake.open(cuda_graphs=True)
    x = pixels(MAX_BATCH)
    for n in (2, 2, 2, 5):
        np.testing.assert_array_equal(backend.embed_images(x[:n]), embedding(x[:n]))
    assert "CUDA graph capture failed" in caplog.text and fake.cuda.launches == 0 and not fake.cuda.graphs


# ---- 11: a failed capture raises its own error and leaves no graph behind ------------------------------
@pytest.mark.parametrize("end_capture", [None, (Err.cudaErrorStreamCaptureInvalidated, False),
                                         (Err.cudaErrorStreamCaptureInvalidated, True), (OK, True)],
                         ids=["invalidated", "invalidated-no-graph", "invalidated-partial-graph", "valid-graph"])
def test_a_failed_enqueue_during_capture_raises_its_error_and_destroys_the_graph(fake, end_capture):
    stream = Stream()

    def enqueue(s):
        fake.cuda.cudaMemcpyAsync(0, 0, 0, H2D, s.handle)  # something captured before the failure
        if end_capture is None:
            fake.cuda.cudaStreamSynchronize(s.handle)  # a rule broken: CUDA invalidates the capture
        raise CudaError("TensorRT could not enqueue the vision engine")

    fake.cuda.end_capture_gives = end_capture
    with pytest.raises(CudaError, match="could not enqueue"):
        Graph(stream, enqueue)
    assert fake.cuda.stream(stream.handle).capture is None  # capture mode ended
    assert not fake.cuda.graphs and not fake.cuda.execs
    graph = Graph(stream, lambda s: fake.cuda.cudaMemcpyAsync(0, 0, 0, H2D, s.handle))  # the stream captures again
    assert not fake.cuda.graphs and len(fake.cuda.execs) == 1  # the executable graph keeps what it needs
    graph.free()
    stream.free()


def test_a_failed_instantiation_raises_its_error_and_destroys_the_graph(fake, monkeypatch):
    monkeypatch.setattr(fake.cuda, "cudaGraphInstantiate", lambda graph, flags: (Err.cudaErrorInvalidValue, None),
                        raising=False)
    stream = Stream()
    with pytest.raises(CudaError, match="cudaErrorInvalidValue"):
        Graph(stream, lambda s: None)
    assert not fake.cuda.graphs and not fake.cuda.execs
    stream.free()


# ---- 12: synchronize never touches a stream another thread is capturing on -----------------------------
class FakeDeviceArray:
    """Pixels in (fake) device memory, published through the CUDA array interface v3 with the stream
    its producer wrote them on."""

    def __init__(self, cuda: FakeCuda, x: np.ndarray):
        _, ptr = cuda.cudaMalloc(x.nbytes)
        _, producer = cuda.cudaStreamCreateWithFlags(cuda.cudaStreamNonBlocking)
        array_at(ptr, x.shape, x.dtype)[...] = x
        self.free = lambda: (cuda.cudaFree(ptr), cuda.cudaStreamDestroy(producer))
        self.__cuda_array_interface__ = {"shape": x.shape, "typestr": "<f4", "data": (ptr, False), "strides": None,
                                         "version": 3, "stream": int(producer)}


@pytest.mark.parametrize("meanwhile", ["synchronize", "a device array's stream hand-off"])
def test_nothing_touches_the_compute_stream_while_another_thread_captures_on_it(fake, meanwhile):
    """A stream under capture must not be synchronized or made to wait for outside work: CUDA refuses
    it and invalidates the capture. Captures happen under the backend's lock; so do these."""
    backend = fake.open(cuda_graphs=True)
    vision, x = fake.engines["vision"], pixels(2)
    device_array = FakeDeviceArray(fake.cuda, pixels(3, seed=1))
    vision.hold_capture = threading.Event()
    results, errors = {}, []

    def attempt(name, fn, *args):
        try:
            results[name] = fn(*args)
        except Exception as e:  # noqa: BLE001 - reported by the asserts below
            errors.append(e)

    worker = threading.Thread(target=attempt, args=("captured", backend.embed_images, x))
    worker.start()
    assert vision.capturing.wait(10)
    other = (threading.Thread(target=attempt, args=("synchronized", backend.synchronize)) if meanwhile == "synchronize"
             else threading.Thread(target=attempt, args=("bound", backend.embed_images, device_array)))
    other.start()
    other.join(0.5)  # without the lock it would have failed by now, breaking the capture
    vision.hold_capture.set()
    worker.join(10)
    other.join(10)
    assert errors == [] and not worker.is_alive() and not other.is_alive()
    np.testing.assert_array_equal(results["captured"], embedding(x))
    if meanwhile != "synchronize":
        np.testing.assert_array_equal(results["bound"], embedding(pixels(3, seed=1)))
    backend.embed_images(x)  # of these two calls, one replays the first capture and one captures its slot's
    backend.embed_images(x)
    assert fake.cuda.launches == 1
    device_array.free()


# ---- 13: a host batch is copied once on the host, straight into pinned memory --------------------------
def test_a_host_batch_is_copied_once_into_pinned_memory_whatever_its_layout(fake):
    backend = fake.open()
    x = pixels(2 * MAX_BATCH)[::2]  # not contiguous
    want = embedding(np.ascontiguousarray(x))
    np.testing.assert_array_equal(backend.embed_images(x), want)
    fake.cuda.copies.clear()
    tracemalloc.start()
    try:
        got = backend.embed_images(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, want)
    assert peak < x.nbytes / 4, f"{peak} bytes allocated on the host for a {x.nbytes}-byte batch"
    assert fake.cuda.copies == Counter({H2D: 1, D2H: 1})
    ids = np.arange(MAX_BATCH * 20, dtype=np.int64).reshape(MAX_BATCH, 20)[:, ::2] % 1000
    np.testing.assert_array_equal(backend.embed_text(ids), embedding(np.ascontiguousarray(ids)))


# ---- 5: the probe and the CUDA layer on machines without bindings or without a driver ------------------
def with_a_gpu(monkeypatch):
    exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: p == "/dev/nvidia0" or exists(p))


def test_the_probe_wants_cuda_bindings_not_any_cuda_package(monkeypatch):
    with_a_gpu(monkeypatch)
    find_spec, present = importlib.util.find_spec, {"tensorrt", "cuda", "cuda.bindings"}  # what is installed

    def fake_find_spec(name, *args):
        if name in ("tensorrt", "cuda", "cuda.bindings"):
            if name == "cuda.bindings" and "raise" in present:
                raise ValueError("cuda.__spec__ is None")  # what a broken parent package gives
            return object() if name in present else None
        return find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    assert BACKENDS["tensorrt"].unavailable() is None
    present.discard("cuda.bindings")  # cuda-python 12.6.0, or only cuda-pathfinder / cuda-core
    assert BACKENDS["tensorrt"].unavailable() == "cuda-python>=12.6.1 (cuda.bindings) not installed"
    present.add("raise")
    assert BACKENDS["tensorrt"].unavailable() == "cuda-python>=12.6.1 (cuda.bindings) not installed"
    present.discard("tensorrt")
    assert BACKENDS["tensorrt"].unavailable() == "tensorrt, cuda-python>=12.6.1 (cuda.bindings) not installed"


@pytest.mark.parametrize("blocked, says", [
    ("cuda", ["needs cuda", "pip install 'pickscore-runtime[tensorrt]'"]),  # no cuda-python at all
    ("cuda.bindings", ["needs cuda-python>=12.6.1", "has no cuda.bindings: upgrade it", "[tensorrt]"]),  # 12.6.0
])
def test_a_missing_or_too_old_cuda_python_names_the_extra(blocked, says):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == {blocked!r} or name.startswith({blocked!r} + "."):
                    raise ImportError("blocked: " + name, name=name)
        sys.meta_path.insert(0, Block())
        if {blocked!r} != "cuda":
            import cuda  # the namespace package is there, as with cuda-python 12.6.0
        from pickscore_runtime.cuda_memory import current_device
        from pickscore_runtime.errors import MissingExtraError
        try:
            current_device()
        except MissingExtraError as e:
            print("MISSING", e)
    """)], capture_output=True, text=True, timeout=120)
    assert "MISSING CUDA buffers for the GPU backends (cuda-python) " in out.stdout, out.stderr[-2000:]
    assert all(text in out.stdout for text in says), out.stdout


def test_bindings_that_cannot_load_the_driver_library_raise_our_error():
    def cuInit(flags):  # what cuda-bindings 12.9 and 13.5 do without a driver, instead of returning an error code
        raise RuntimeError("Failed to dlopen libcuda.so.1")

    with pytest.raises(BackendUnavailableError, match=r"CUDA cannot run here: cuInit: .*Failed to dlopen libcuda\.so\.1"):
        call(cuInit, 0)

    def cudaMalloc(n):
        raise RuntimeError("something else")

    with pytest.raises(CudaError, match="cudaMalloc: RuntimeError: something else"):
        call(cudaMalloc, 1)


def test_a_driver_older_than_the_bindings_is_named_with_both_cuda_versions(fake):
    fake.cuda.cudaDriverGetVersion = lambda: (OK, 12040)  # an R550 driver
    fake.cuda.cudaRuntimeGetVersion = lambda: (OK, 13000)  # cuda-bindings 13, what an unpinned install gets

    def cudaGetDevice():
        return Err.cudaErrorInsufficientDriver, None

    with pytest.raises(BackendUnavailableError, match=r"cudaGetDevice: cudaErrorInsufficientDriver .*the NVIDIA driver "
                                                      r"supports CUDA 12\.4, these cuda-bindings are for CUDA 13\.0: "
                                                      r"install cuda-python 12\.x"):
        call(cudaGetDevice)


def test_the_real_bindings_on_this_machine_fail_only_with_our_errors():
    """Real cuda-bindings (installed with the test extra): without a driver the runtime API returns an error
    code and the driver API raises while loading libcuda; both come out as BackendUnavailableError."""
    from cuda.bindings import driver

    if os.path.exists("/proc/driver/nvidia/version"):  # a GPU machine: both work
        assert current_device().total_memory > 0
        call(driver.cuInit, 0)
        return
    with pytest.raises(BackendUnavailableError, match="cudaGetDevice: .*no NVIDIA driver is loaded on this machine"):
        current_device()
    with pytest.raises(BackendUnavailableError, match="cuInit: cuda-bindings could not load the NVIDIA driver library"):
        call(driver.cuInit, 0)
    with pytest.raises(PickScoreError):  # what bench.gpu_memory_probe catches
        cuda_memory.memory_in_use_mb()
