"""The `tensorrt` backend: one TensorRT engine per tower, built from the artifacts' ONNX files for this
GPU (runtime/engines), run without torch through cuda-python.

- Buffers are allocated once, for the profile's largest batch: two vision slots (pinned host input,
  device input, device output, pinned host output) and one for text. A host batch is copied once on the
  host, from the caller's array (any layout) straight into its slot's pinned memory.
- `submit_images` copies a batch to its slot's device input on a copy stream while the previous batch
  computes on the compute stream (`queue_depth = 2`: the pipeline keeps two batches submitted), then
  enqueues the engine behind that copy; `result()` waits for the batch's own event only.
- A device array (anything with `__dlpack__` or `__cuda_array_interface__` on the GPU: a torch CUDA
  tensor, a CuPy array) is bound in place: no copy through the host. DLPack producers order their
  pending writes before our compute stream reads them.
- `cuda_graphs=True` captures one CUDA graph per (slot, batch size) for host inputs and replays it:
  one launch per batch instead of one per kernel, which matters at small batches. Each graph has an
  execution context of its own (engines/contexts.py says why).

A batch larger than the engine's profile is split. A scorer may be used from several threads: enqueues
(and graph captures) take a lock, and a slot is reused only after its previous batch has been collected.
Not run on a GPU yet: tests/test_tensorrt_logic.py runs this logic on fake engines and a fake CUDA runtime.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

from ..artifacts import Artifacts
from ..console import say as stderr  # the default for a build's progress lines
from ..cuda_memory import DeviceBuffer, Event, PinnedArray, Stream, cudart, current_device, free_all
from ..device_arrays import DeviceArrayView, device_view, is_device_array
from ..engines.build import build_command, engine_key, ensure_engine, load_tensorrt, machine_environment, trt_logger
from ..engines.contexts import StreamContexts, TowerEngine
from ..engines.profiles import DEFAULT_MAX_BATCH, BuildFlags
from ..engines.records import EngineMismatchError
from ..engines.store import EngineStore
from ..errors import PickScoreError
from ..towers import TOWERS, TensorSpec, TowerSpec
from .base import BackendBase


def open_engines(trt: Any, artifacts: Artifacts, specs: dict[str, TowerSpec], precision: str, batch_size: int,
                 build: bool, engine_flags: BuildFlags | None,
                 progress: Callable[[str], None]) -> tuple[Any, dict[str, TowerEngine], dict[str, str]]:
    """The TensorRT runtime (kept alive as long as its engines), each tower's engine, and its file: a
    stored engine for this machine, built first when none fits and `build` allows."""
    env = machine_environment(trt)
    flags = engine_flags or BuildFlags(max_batch=max(DEFAULT_MAX_BATCH, batch_size))
    store = EngineStore(artifacts)
    runtime = trt.Runtime(trt_logger(trt))
    engines, files = {}, {}
    for tower in TOWERS:
        key = engine_key(artifacts, tower, precision, env, flags)
        record, path = ensure_engine(trt, store, key, batch_size, engine_flags is not None, build, progress)
        engines[tower] = TowerEngine.load(trt, runtime, path, specs[tower],
                                          build_command(artifacts.root, precision, record.key.flags))
        files[tower] = str(path)
    return runtime, engines, files


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
        self._closed, self._next, self._runtime = False, 0, None
        self._engines: dict[str, TowerEngine] = {}
        self._runs: dict[str, StreamContexts] = {}
        self._slots: list[Slot] = []
        self._text_slot: Slot | None = None
        self._copy = self._compute = None
        self.cuda_device = current_device()
        specs = self.specs = artifacts.specs()
        self.engine_files: dict[str, str] = {}
        try:
            self._runtime, self._engines, self.engine_files = open_engines(trt, artifacts, specs, precision, batch_size,
                                                                           build, engine_flags, progress)
            vision, text = self._engines["vision"], self._engines["text"]
            if batch_size > vision.max_batch:
                raise EngineMismatchError(f"batch size {batch_size} exceeds the vision engine's profile (max batch "
                                          f"{vision.max_batch}); build one with --max-batch {batch_size}")
            self._copy, self._compute = Stream(), Stream()
            # every engine run goes on the compute stream, so each engine's contexts share one memory block
            for tower, engine in self._engines.items():
                self._runs[tower] = StreamContexts(engine, self._compute)
            self._slots = [Slot(i, specs["vision"].input, vision.max_shape, vision.width) for i in range(self.queue_depth)]
            self._text_slot = Slot(-1, specs["text"].input, text.max_shape, text.width)
        except BaseException:
            self.close()
            raise

    # ---- text (inputs checked by BackendBase) -------------------------------------------------
    def _infer_text(self, input_ids: np.ndarray) -> np.ndarray:
        engine = self._engines_or_closed()["text"]
        out = []
        with self.lock:
            slot, stream, run = self._text_slot, self._compute, self._runs["text"]
            for start in range(0, len(input_ids), engine.max_batch):
                chunk = input_ids[start : start + engine.max_batch]
                np.copyto(slot.host_in.view(chunk.shape), chunk)  # the one host copy, from any layout
                stream.copy_to_device(slot.dev_in.ptr, slot.host_in.ptr, chunk.nbytes)
                run.run(slot.dev_in.ptr, slot.dev_out.ptr, chunk.shape)
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
            with self.lock:  # the producer's hand-off queues a wait on the compute stream: never during a capture
                view = self._device_input(pixel_values)
                per_image = view.nbytes // max(view.shape[0], 1)
                parts = [self._submit_device(view, start, min(engine.max_batch, view.shape[0] - start), per_image)
                         for start in range(0, view.shape[0], engine.max_batch)]
        else:  # not made contiguous here: _submit_host copies each part straight into pinned memory
            parts = [self._submit_host(pixel_values[start : start + engine.max_batch])
                     for start in range(0, len(pixel_values), engine.max_batch)]
        return parts[0] if len(parts) == 1 else Joined(parts)

    def _device_input(self, x: Any) -> DeviceArrayView:
        """`x` bound in place, our compute stream ordered after its producer's writes (the caller holds the lock)."""
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
            np.copyto(slot.host_in.view(pixels.shape), pixels)  # the one host copy, from any layout
            self._copy.copy_to_device(slot.dev_in.ptr, slot.host_in.ptr, pixels.nbytes)
            slot.copied.record(self._copy)
            self._compute.wait(slot.copied)  # compute follows this batch's copy, not the copy stream's later work
            graph_key = (slot.index, n) if self.cuda_graphs else None  # a slot's addresses and a batch size
            self._runs["vision"].run(slot.dev_in.ptr, slot.dev_out.ptr, pixels.shape, graph_key)
            return self._finish(slot, n, engine.width)

    def _submit_device(self, view: DeviceArrayView, start: int, n: int, per_image: int) -> PendingBatch:
        """(The caller holds the lock.)"""
        slot = self._acquire_slot()
        self._runs["vision"].run(view.ptr + start * per_image, slot.dev_out.ptr, (n, *view.shape[1:]))
        return self._finish(slot, n, self._engines["vision"].width, keep=view)

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

    # ---- lifecycle ----------------------------------------------------------------------------
    def _engines_or_closed(self) -> dict[str, TowerEngine]:
        if self._closed:
            raise PickScoreError("this tensorrt backend is closed")
        return self._engines

    def _streams(self) -> list[Stream]:
        return [s for s in (self._copy, self._compute) if s is not None]

    def synchronize(self) -> None:
        """Wait for all work queued so far. Another thread may be capturing a CUDA graph on the compute
        stream, and synchronizing a stream under capture fails and invalidates the capture; captures
        happen under the lock, so events recorded under it mark the queued work, and are waited for
        outside it (other threads may enqueue meanwhile)."""
        with self.lock:
            if self._closed:
                return
            marks = []
            try:
                for stream in self._streams():
                    marks.append(Event())
                    marks[-1].record(stream)
            except BaseException:
                free_all(*marks)
                raise
        try:
            for mark in marks:
                mark.synchronize()
        finally:
            free_all(*marks)

    def close(self) -> None:
        with self.lock:
            if self._closed:
                return
            self._closed = True
            try:
                for stream in self._streams():  # safe under the lock: no capture is under way
                    stream.synchronize()
                for slot in self._slots:
                    if slot.pending is not None:
                        slot.pending.collect()  # a batch still held by a caller keeps its result
            finally:
                runs, self._runs = list(self._runs.values()), {}
                slots, self._slots, text, self._text_slot = self._slots, [], self._text_slot, None
                engines, self._engines = list(self._engines.values()), {}
                streams, self._copy, self._compute = (self._copy, self._compute), None, None
                try:
                    free_all(*runs, *slots, text, *engines, *streams)  # graphs and contexts before their engines
                finally:
                    self._runtime = None


def create(artifacts: Artifacts, name: str, precision: str, batch_size: int, threads: int | None = None,
           build: bool = True, engine_flags: BuildFlags | None = None, cuda_graphs: bool = False,
           progress: Callable[[str], None] | None = None) -> TensorRTBackend:
    """build=False (`--no-build`): refuse instead of building a missing engine. engine_flags: load (or
    build) exactly these; by default any stored engine for this machine whose profile holds batch_size."""
    return TensorRTBackend(artifacts, precision, batch_size, build, engine_flags, cuda_graphs, progress or stderr)
