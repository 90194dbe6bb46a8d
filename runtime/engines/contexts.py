"""Running a loaded TensorRT engine: the engine checked against its tower spec (`TowerEngine`), and its
execution contexts on one CUDA stream (`StreamContexts`), eager and captured into CUDA graphs.

A CUDA graph replays the kernels TensorRT enqueued for one input shape, and those kernels read state
that the execution context keeps for that shape; enqueueing another shape on the same context changes
that state under the graph, which then computes wrong numbers (NVIDIA/TensorRT#3798). So each captured
graph gets an execution context of its own that never runs another shape, as TensorRT's developer guide
advises. The contexts share one block of device memory for their activations (USER_MANAGED), which is
safe only because they never run at the same time: the block belongs to one stream, whose work runs in
order, and every run goes through its `StreamContexts`, which knows no other stream.

Not run on a GPU yet (TensorRT cannot be installed where this was written); tests/test_tensorrt_logic.py
drives it with fake engines and a fake CUDA runtime.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..cuda_memory import CudaError, DeviceBuffer, Graph, Stream, free_all
from ..errors import PickScoreError
from ..towers import TowerSpec
from .build import read_engine
from .records import EngineMismatchError

log = logging.getLogger("pickscore")


class TowerEngine:
    """One deserialized engine, checked against the tower spec: its IO dtypes, its profile's largest input
    (`max_shape`, `max_batch`) and the device memory one of its contexts needs (`memory_size`)."""

    def __init__(self, trt: Any, engine: Any, spec: TowerSpec, source: str):
        self.engine, self.spec = engine, spec
        self.input, self.output = spec.input.name, spec.output.name
        for tensor in (spec.input, spec.output):
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(tensor.name)))
            if dtype != np.dtype(tensor.dtype):
                raise EngineMismatchError(f"{source}: {tensor.name} is {dtype}, the tower spec says {tensor.dtype}")
        _, _, most = engine.get_tensor_profile_shape(self.input, 0)
        self.max_shape = tuple(int(d) for d in most)
        self.max_batch = self.max_shape[0]
        self.width = int(spec.output.shape[1])
        self.user_managed = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.memory_size = int(engine.device_memory_size_v2)  # the largest any shape of any profile needs

    @classmethod
    def load(cls, trt: Any, runtime: Any, path: Path, spec: TowerSpec, rebuild: str) -> "TowerEngine":
        with read_engine(path) as data:
            engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise EngineMismatchError(f"TensorRT could not deserialize {path} (its log above says why); rebuild it "
                                      f"with `{rebuild} --force`")
        return cls(trt, engine, spec, str(path))

    def new_context(self, memory: DeviceBuffer) -> Any:
        """An execution context whose activations live in `memory` (at least `memory_size` bytes)."""
        context = self.engine.create_execution_context(self.user_managed)
        if context is None:
            raise CudaError(f"TensorRT could not create an execution context for the {self.spec.name} engine "
                            "(its log says why)")
        context.set_device_memory(memory.ptr, self.memory_size)
        return context

    def enqueue(self, context: Any, stream: Stream, in_ptr: int, out_ptr: int, shape: tuple[int, ...]) -> None:
        if not context.set_input_shape(self.input, shape):
            raise PickScoreError(f"{self.spec.name} engine: input shape {shape} is outside its profile (max {self.max_shape})")
        context.set_tensor_address(self.input, in_ptr)
        context.set_tensor_address(self.output, out_ptr)
        if not context.execute_async_v3(stream.handle):
            raise CudaError(f"TensorRT could not enqueue the {self.spec.name} engine for shape {shape} (its log says why)")

    def free(self) -> None:
        self.engine = None  # its contexts (StreamContexts) are freed first


class CapturedRun:
    """A CUDA graph of one engine run, with the context it was captured on and what it was captured with."""

    def __init__(self, context: Any, graph: Graph, addresses: tuple[int, int], shape: tuple[int, ...]):
        self.context, self.graph, self.addresses, self.shape = context, graph, addresses, shape


class StreamContexts:
    """An engine's execution contexts on one stream, sharing one device memory block: one for eager runs,
    and one per CUDA graph, each captured on first use of its key and replayed afterwards. The caller
    serialises calls (the backend's lock), so no capture is ever under way while another call runs."""

    def __init__(self, engine: TowerEngine, stream: Stream):
        self.engine, self.stream = engine, stream
        self.captured: dict[Any, CapturedRun] = {}
        self.capture_failed = False
        self.memory: DeviceBuffer | None = DeviceBuffer(max(engine.memory_size, 1))
        try:
            self.eager = engine.new_context(self.memory)
        except BaseException:
            self.free()
            raise

    def run(self, in_ptr: int, out_ptr: int, shape: tuple[int, ...], graph_key: Any = None) -> None:
        """Enqueue the engine on this stream. With a `graph_key` (one per set of addresses and shape), replay
        that key's CUDA graph, or run it once eagerly on a new context and capture it (falling back to eager
        runs for good when a capture fails)."""
        if graph_key is None or self.capture_failed:
            self.engine.enqueue(self.eager, self.stream, in_ptr, out_ptr, shape)
            return
        run = self.captured.get(graph_key)
        if run is not None:
            if (run.addresses, run.shape) != ((in_ptr, out_ptr), shape):
                raise PickScoreError(f"CUDA graph {graph_key!r} was captured for {run.shape} at other addresses")
            run.graph.launch(self.stream)
            return
        context = self.engine.new_context(self.memory)
        # the eager run computes this batch and readies the new context for capture (TensorRT allocates and
        # initialises on a context's first enqueue of a shape, which must not be captured)
        self.engine.enqueue(context, self.stream, in_ptr, out_ptr, shape)
        try:
            graph = Graph(self.stream, lambda s: self.engine.enqueue(context, s, in_ptr, out_ptr, shape))
        except (CudaError, PickScoreError) as e:
            self.capture_failed = True
            log.warning("CUDA graph capture failed (%s); running without CUDA graphs", e)
            return
        self.captured[graph_key] = CapturedRun(context, graph, (in_ptr, out_ptr), shape)

    def free(self) -> None:
        """Graphs, then contexts, then their memory (the caller has synchronized the stream)."""
        runs, self.captured = list(self.captured.values()), {}
        self.eager = None
        memory, self.memory = self.memory, None
        try:
            free_all(*(r.graph for r in runs))
        finally:
            runs.clear()  # drops the contexts before the memory they use
            free_all(memory)
