"""ONNX Runtime on a device (`onnx-cuda`): I/O binding, device arrays bound in place, and CUDA graphs over
bucketed batch sizes. Written device-agnostic: the same code runs on "cpu", which is how CI tests it.

- `BoundRunner`: the input goes to the device once (or is bound in place when it already lives there)
  and the output stays on the device until it is copied back once, instead of ONNX Runtime's default
  round trip through its own host-side buffers. A device array is bound only after its producer's
  writes are done (see `BoundRunner.run`).
- `BucketedRunner`: ONNX Runtime's CUDA graphs need fixed shapes and fixed input/output addresses. So
  each bucket (a batch size) gets its own session, with the batch axis fixed by a free-dimension
  override (which also lets ONNX Runtime fold the shape arithmetic that would otherwise run on the
  CPU), and its own input and output buffers on the device, bound once. A batch is padded up to the
  smallest bucket that holds it. Each session holds its own copy of the weights on the device.

The runners take inputs as the backend's base class checked them (BackendBase: dtype, rank, shape, a
batch of at least one row); they do not check again.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import numpy as np

from ..buckets import bucket_for, row_chunks
from ..device_arrays import DeviceArrayView
from ..towers import TowerSpec


class BoundRunner:
    """One session run through I/O binding on `device` ("cuda" or "cpu")."""

    def __init__(self, session: Any, spec: TowerSpec, device: str, device_id: int = 0):
        self.session, self.spec, self.device, self.device_id = session, spec, device, device_id

    def run(self, x: np.ndarray | DeviceArrayView) -> np.ndarray:
        """Run on a host array, or on a device array bound in place.

        A device array may still be being written by its producer (torch, CuPy, ...) on the producer's
        stream, while ONNX Runtime's CUDA EP computes on a non-blocking stream of its own that waits for
        no other. So before the run, `synchronize_inputs()` (ONNX Runtime's call for memory "operated on
        a different stream"; for the CUDA EP a cudaDeviceSynchronize) waits on the host for all work
        queued on the device, the producer's stream whichever it is included: what DLPack's stream
        contract and the CUDA array interface's `stream` key ask a consumer to order. Not ONNX Runtime's
        `user_compute_stream`: it is fixed when the session is made, while the producer's stream can
        change from call to call, and ONNX Runtime takes torch's default stream (handle 0) for "none".
        Not run on a GPU yet."""
        name = self.spec.input.name
        binding = self.session.io_binding()
        if isinstance(x, DeviceArrayView):
            if x.device != self.device:
                raise ValueError(f"{name} lives on {x.device}, this session runs on {self.device}")
            device_id = self.device_id if x.device_id < 0 else x.device_id
            binding.bind_input(name, x.device, device_id, x.dtype.type, list(x.shape), x.ptr)
            binding.synchronize_inputs()
        else:
            binding.bind_cpu_input(name, np.ascontiguousarray(x))
        binding.bind_output(self.spec.output.name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def default_buckets(batch_size: int) -> tuple[int, ...]:
    return tuple(sorted({b for b in (1, 8, batch_size) if b <= batch_size}))


class BucketedRunner:
    """Fixed-shape sessions, one per bucket, each with its input and output bound once on the device."""

    def __init__(self, make_session: Callable[[int], Any], spec: TowerSpec, buckets: Sequence[int], device: str,
                 device_id: int = 0):
        import onnxruntime as ort

        self.spec, self.buckets = spec, tuple(sorted(set(buckets)))
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {buckets}")
        self._lock = threading.Lock()  # a bucket's bound buffers serve one call at a time
        self._bound: dict[int, tuple[Any, Any, Any, Any]] = {}
        in_shape = [d for d in spec.input.shape[1:]]
        out_shape = [d for d in spec.output.shape[1:]]
        for b in self.buckets:
            session = make_session(b)
            x = ort.OrtValue.ortvalue_from_shape_and_type([b, *in_shape], np.dtype(spec.input.dtype).type, device, device_id)
            y = ort.OrtValue.ortvalue_from_shape_and_type([b, *out_shape], np.dtype(spec.output.dtype).type, device, device_id)
            binding = session.io_binding()
            binding.bind_ortvalue_input(spec.input.name, x)
            binding.bind_ortvalue_output(spec.output.name, y)
            self._bound[b] = (session, binding, x, y)

    def run(self, x: np.ndarray) -> np.ndarray:
        chunks = row_chunks(len(x), self.buckets[-1])
        return self._run_padded(x) if len(chunks) == 1 else np.concatenate([self._run_padded(x[c]) for c in chunks])

    def _run_padded(self, x: np.ndarray) -> np.ndarray:
        n, b = len(x), bucket_for(len(x), self.buckets)
        padded = x if n == b else np.concatenate([x, np.zeros((b - n, *x.shape[1:]), x.dtype)])
        session, binding, x_value, _ = self._bound[b]
        with self._lock:
            x_value.update_inplace(np.ascontiguousarray(padded))
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0][:n].copy()


class GraphRunner:
    """Host batches through the buckets (CUDA graphs), device arrays through plain I/O binding (their
    addresses change from call to call, which a captured graph cannot follow)."""

    def __init__(self, buckets: BucketedRunner, bound: BoundRunner):
        self.buckets, self.bound = buckets, bound

    def run(self, x: np.ndarray | DeviceArrayView) -> np.ndarray:
        return self.bound.run(x) if isinstance(x, DeviceArrayView) else self.buckets.run(x)
