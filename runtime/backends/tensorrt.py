"""The `tensorrt` backend: one TensorRT engine per tower, built from the artifacts' ONNX files for this
GPU (runtime/engines), run without torch through cuda-python.

- Buffers are allocated once, for the profile's largest batch: two vision slots (pinned host input,
  device input, device output, pinned host output) and one for text.
- `submit_images` copies a batch to its slot's device input on a copy stream while the previous batch
  computes on the compute stream (`queue_depth = 2`: the pipeline keeps two batches submitted), then
  enqueues the engine behind that copy; `result()` waits for the batch's own event only.
- A device array (anything with `__dlpack__` or `__cuda_array_interface__` on the GPU: a torch CUDA
  tensor, a CuPy array) is bound in place: no copy through the host. DLPack producers order their
  pending writes before our compute stream reads them.
- `cuda_graphs=True` captures one CUDA graph per (slot, batch size) for host inputs and replays it:
  one launch per batch instead of one per kernel, which matters at small batches.

A batch larger than the engine's profile is split. A scorer may be used from several threads: enqueues
take a lock, and a slot is reused only after its previous batch has been collected.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import numpy as np

from ..artifacts import Artifacts
from ..console import say as stderr  # the default for a build's progress lines
from ..cuda_memory import CudaError, DeviceBuffer, Event, Graph, PinnedArray, Stream, cudart, current_device
from ..device_arrays import DeviceArrayView, device_view, is_device_array
from ..engines.build import (build_command, engine_key, ensure_engine, load_tensorrt, machine_environment, read_engine,
                             trt_logger)
from ..engines.profiles import DEFAULT_MAX_BATCH, BuildFlags
from ..engines.records import EngineMismatchError, EngineRecord
from ..engines.store import EngineStore
from ..errors import PickScoreError
from ..towers import TOWERS, TensorSpec, TowerSpec
from .base import BackendBase

log = logging.getLogger("pickscore")


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


class TowerEngine:
    """One deserialized engine and its execution context, checked against the tower spec."""

    def __init__(self, trt: Any, runtime: Any, path: Any, record: EngineRecord, spec: TowerSpec, rebuild: str):
        with read_engine(path) as data:
            self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise EngineMismatchError(f"TensorRT could not deserialize {path} (its log above says why); rebuild it "
                                      f"with `{rebuild} --force`")
        self.spec, self.record = spec, record
        self.input, self.output = spec.input.name, spec.output.name
        for tensor in (spec.input, spec.output):
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(tensor.name)))
            if dtype != np.dtype(tensor.dtype):
                raise EngineMismatchError(f"{path}: {tensor.name} is {dtype}, the tower spec says {tensor.dtype}")
        _, _, most = self.engine.get_tensor_profile_shape(self.input, 0)
        self.max_shape = tuple(int(d) for d in most)
        self.max_batch = self.max_shape[0]
        self.width = int(spec.output.shape[1])
        self.context = self.engine.create_execution_context()

    def enqueue(self, stream: Stream, in_ptr: int, out_ptr: int, shape: tuple[int, ...]) -> None:
        ctx = self.context
        if not ctx.set_input_shape(self.input, shape):
            raise PickScoreError(f"{self.spec.name} engine: input shape {shape} is outside its profile (max {self.max_shape})")
        ctx.set_tensor_address(self.input, in_ptr)
        ctx.set_tensor_address(self.output, out_ptr)
        if not ctx.execute_async_v3(stream.handle):
            raise CudaError(f"TensorRT could not enqueue the {self.spec.name} engine for shape {shape} (its log says why)")

    def free(self) -> None:
        self.context = None  # the context goes before its engine
        self.engine = None


class Slot:
    """Buffers for one batch in flight, sized for the engine's largest batch."""

    def __init__(self, index: int, tensor: TensorSpec, max_shape: tuple[int, ...], width: int):
        self.index, self.pending = index, None
        self.host_in = PinnedArray(max_shape, tensor.dtype)
        self.dev_in = DeviceBuffer(self.host_in.nbytes)
        self.host_out = PinnedArray((max_shape[0], width), np.float32)
        self.dev_out = DeviceBuffer(self.host_out.nbytes)
        self.copied, self.done = Event(), Event()

    def free(self) -> None:
        free_all(self.copied, self.done, self.dev_in, self.dev_out, self.host_in, self.host_out)


class PendingBatch:
    """One submitted batch. `result()` waits for this batch's event, not for the whole device."""

    def __init__(self, backend: "TensorRTBackend", slot: Slot, n: int, keep: Any = None):
        self._backend, self._slot, self._n, self._keep = backend, slot, n, keep
        self._value: np.ndarray | None = None

    def result(self) -> np.ndarray:
        if self._value is None:
            self._slot.done.synchronize()  # outside the lock: other threads may enqueue meanwhile
            with self._backend.lock:
                self.collect()
        return self._value

    def collect(self) -> None:
        """Copy the finished batch out of its slot (the caller holds the lock; the batch is done)."""
        if self._value is None:
            self._value = self._slot.host_out.view((self._n, self._slot.host_out.array.shape[1])).copy()
            self._slot.pending, self._keep = None, None


class Joined:
    """Several pending batches (one input split to fit the profile) as one."""

    def __init__(self, parts: list[Any]):
        self._parts = parts

    def result(self) -> np.ndarray:
        return np.concatenate([p.result() for p in self._parts])


class TensorRTBackend(BackendBase):
    name = "tensorrt"
    device = "cuda"
    queue_depth = 2

    def __init__(self, artifacts: Artifacts, precision: str, batch_size: int, build: bool = True,
                 engine_flags: BuildFlags | None = None, cuda_graphs: bool = False,
                 progress: Callable[[str], None] = stderr):
        trt = load_tensorrt("the tensorrt backend")
        cudart()  # cuda-python is part of the [tensorrt] extra: say so before touching the GPU
        self.precision, self.batch_size, self.cuda_graphs = precision, batch_size, cuda_graphs
        self.lock = threading.Lock()
        self._closed, self._next, self._graphs, self._graph_failed = False, 0, {}, False
        self._engines: dict[str, TowerEngine] = {}
        self._slots: list[Slot] = []
        self._text_slot: Slot | None = None
        self._copy = self._compute = None
        self.cuda_device = current_device()
        env = machine_environment(trt)
        flags = engine_flags or BuildFlags(max_batch=max(DEFAULT_MAX_BATCH, batch_size))
        store = EngineStore(artifacts)
        specs = self.specs = artifacts.specs()
        self.engine_files: dict[str, str] = {}
        try:
            self._runtime = trt.Runtime(trt_logger(trt))
            for tower in TOWERS:
                key = engine_key(artifacts, tower, precision, env, flags)
                record, path = ensure_engine(trt, store, key, batch_size, engine_flags is not None, build, progress)
                self._engines[tower] = TowerEngine(trt, self._runtime, path, record, specs[tower],
                                                   build_command(artifacts.root, precision, record.key.flags))
                self.engine_files[tower] = str(path)
            vision, text = self._engines["vision"], self._engines["text"]
            if batch_size > vision.max_batch:
                raise EngineMismatchError(f"batch size {batch_size} exceeds the vision engine's profile (max batch "
                                          f"{vision.max_batch}); build one with --max-batch {batch_size}")
            self._copy, self._compute = Stream(), Stream()
            self._slots = [Slot(i, specs["vision"].input, vision.max_shape, vision.width) for i in range(self.queue_depth)]
            self._text_slot = Slot(-1, specs["text"].input, text.max_shape, text.width)
        except BaseException:
            self.close()
            raise

    # ---- text (inputs checked by BackendBase) -------------------------------------------------
    def _infer_text(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids)
        engine = self._engines_or_closed()["text"]
        out = []
        with self.lock:
            slot, stream = self._text_slot, self._compute
            for start in range(0, len(ids), engine.max_batch):
                chunk = ids[start : start + engine.max_batch]
                slot.host_in.view(chunk.shape)[...] = chunk
                stream.copy_to_device(slot.dev_in.ptr, slot.host_in.ptr, chunk.nbytes)
                engine.enqueue(stream, slot.dev_in.ptr, slot.dev_out.ptr, chunk.shape)
                stream.copy_to_host(slot.host_out.ptr, slot.dev_out.ptr, len(chunk) * engine.width * 4)
                slot.done.record(stream)
                slot.done.synchronize()
                out.append(slot.host_out.view((len(chunk), engine.width)).copy())
        return np.concatenate(out)

    # ---- images (inputs checked by BackendBase) -----------------------------------------------
    def _infer_images(self, pixel_values: Any) -> np.ndarray:
        return self._submit_images(pixel_values).result()

    def _submit_images(self, pixel_values: Any) -> PendingBatch | Joined:
        engine = self._engines_or_closed()["vision"]
        if is_device_array(pixel_values):
            view = self._device_input(pixel_values)
            per_image = view.nbytes // max(view.shape[0], 1)
            parts = [self._submit_device(view, start, min(engine.max_batch, view.shape[0] - start), per_image)
                     for start in range(0, view.shape[0], engine.max_batch)]
        else:
            pixels = np.ascontiguousarray(pixel_values)
            parts = [self._submit_host(pixels[start : start + engine.max_batch])
                     for start in range(0, len(pixels), engine.max_batch)]
        return parts[0] if len(parts) == 1 else Joined(parts)

    def _device_input(self, x: Any) -> DeviceArrayView:
        view = device_view(x, stream=self._compute.handle)  # DLPack: the producer orders its writes on our stream
        if view.device != "cuda" or view.device_id not in (-1, self.cuda_device.index):
            raise PickScoreError(f"pixel_values live on {view.device}:{view.device_id}; this backend runs on "
                                 f"cuda:{self.cuda_device.index}")
        if view.stream:  # CUDA array interface v3: wait for the writes pending on the producer's stream
            self._compute.wait_for_stream(view.stream)
        return view

    def _submit_host(self, pixels: np.ndarray) -> PendingBatch:
        engine, n = self._engines["vision"], len(pixels)
        with self.lock:
            slot = self._acquire_slot()
            slot.host_in.view(pixels.shape)[...] = pixels
            self._copy.copy_to_device(slot.dev_in.ptr, slot.host_in.ptr, pixels.nbytes)
            slot.copied.record(self._copy)
            self._compute.wait(slot.copied)  # compute follows this batch's copy, not the copy stream's later work
            self._run_vision(engine, slot, pixels.shape)
            return self._finish(slot, n, engine.width)

    def _submit_device(self, view: DeviceArrayView, start: int, n: int, per_image: int) -> PendingBatch:
        engine = self._engines["vision"]
        with self.lock:
            slot = self._acquire_slot()
            engine.enqueue(self._compute, view.ptr + start * per_image, slot.dev_out.ptr, (n, *view.shape[1:]))
            return self._finish(slot, n, engine.width, keep=view)

    def _finish(self, slot: Slot, n: int, width: int, keep: Any = None) -> PendingBatch:
        self._compute.copy_to_host(slot.host_out.ptr, slot.dev_out.ptr, n * width * 4)
        slot.done.record(self._compute)
        slot.pending = PendingBatch(self, slot, n, keep)
        return slot.pending

    def _acquire_slot(self) -> Slot:
        """The next slot, its previous batch collected first (the caller holds the lock)."""
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        if slot.pending is not None:
            slot.done.synchronize()
            slot.pending.collect()
        return slot

    def _run_vision(self, engine: TowerEngine, slot: Slot, shape: tuple[int, ...]) -> None:
        key = (slot.index, shape[0])
        graph = self._graphs.get(key)
        if graph is not None:
            graph.launch(self._compute)
            return
        engine.enqueue(self._compute, slot.dev_in.ptr, slot.dev_out.ptr, shape)  # also readies the context for capture
        if self.cuda_graphs and not self._graph_failed:
            try:
                self._graphs[key] = Graph(self._compute, lambda s: engine.enqueue(s, slot.dev_in.ptr, slot.dev_out.ptr, shape))
            except (CudaError, PickScoreError) as e:
                self._graph_failed = True
                log.warning("CUDA graph capture failed (%s); running without CUDA graphs", e)

    # ---- lifecycle ----------------------------------------------------------------------------
    def _engines_or_closed(self) -> dict[str, TowerEngine]:
        if self._closed:
            raise PickScoreError("this tensorrt backend is closed")
        return self._engines

    def synchronize(self) -> None:
        for stream in (self._copy, self._compute):
            if stream is not None:
                stream.synchronize()

    def close(self) -> None:
        with self.lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.synchronize()
                for slot in self._slots:
                    if slot.pending is not None:
                        slot.pending.collect()  # a batch still held by a caller keeps its result
            finally:
                graphs, self._graphs = list(self._graphs.values()), {}
                slots, self._slots, text, self._text_slot = self._slots, [], self._text_slot, None
                engines, self._engines = list(self._engines.values()), {}
                streams, self._copy, self._compute = (self._copy, self._compute), None, None
                try:
                    free_all(*graphs, *slots, text, *engines, *streams)
                finally:
                    self._runtime = None


def create(artifacts: Artifacts, name: str, precision: str, batch_size: int, threads: int | None = None,
           build: bool = True, engine_flags: BuildFlags | None = None, cuda_graphs: bool = False,
           progress: Callable[[str], None] | None = None) -> TensorRTBackend:
    """build=False (`--no-build`): refuse instead of building a missing engine. engine_flags: load (or
    build) exactly these; by default any stored engine for this machine whose profile holds batch_size."""
    return TensorRTBackend(artifacts, precision, batch_size, build, engine_flags, cuda_graphs, progress or stderr)
