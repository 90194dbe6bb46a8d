"""Arrays that already live on a device (a torch CUDA tensor, a CuPy or JAX array, ...), seen through
the two standard protocols, `__dlpack__` and `__cuda_array_interface__`, as a pointer plus shape and
dtype: what the GPU backends bind directly, with no copy through the host. Pure Python (ctypes); no
CUDA library is imported, and torch only when the caller already has (a torch tensor is looked up in
`sys.modules`, never imported).

A torch tensor that requires grad (an RL loop's generations) refuses both protocols (RuntimeError,
BufferError) until it is detached; it is detached here, a view of the same memory.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

# DLPack device types (dlpack.h)
KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED = 1, 2, 3, 13
DEVICE_NAMES = {KDL_CPU: "cpu", KDL_CUDA: "cuda", KDL_CUDA_HOST: "cpu", KDL_CUDA_MANAGED: "cuda"}
DLPACK_FLOAT, DLPACK_INT, DLPACK_UINT, DLPACK_BFLOAT = 2, 0, 1, 4


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


# DLManagedTensor begins with its DLTensor, so a pointer to one is a pointer to the other.
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


@dataclass(frozen=True)
class DeviceArrayView:
    """A C-contiguous array's memory: address, shape, dtype, and where it lives. `owner` keeps the memory
    alive (the array, or the DLPack capsule) for as long as this view is held."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    device: str  # "cuda" | "cpu"
    device_id: int
    owner: Any
    stream: int | None = None  # CUDA array interface v3: the producer's stream, whose pending writes a reader waits for

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def is_torch_tensor(x: Any) -> bool:
    """Whether `x` is a torch tensor; torch is not imported for the question (if it is not loaded, `x` is
    not one of its tensors)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def without_grad(x: Any) -> Any:
    """A torch tensor detached from autograd (same memory, no copy); anything else as it is."""
    return x.detach() if is_torch_tensor(x) else x


def protocol(x: Any, name: str) -> Any:
    """`x`'s attribute `name`, or None when it has none or its property refuses to give one (torch raises
    RuntimeError for a tensor that requires grad, where hasattr would pass the error on)."""
    try:
        return getattr(x, name, None)
    except (RuntimeError, TypeError, ValueError, BufferError):
        return None


def is_device_array(x: Any) -> bool:
    """Whether `x` should be bound in place rather than read as a host array: anything with
    `__cuda_array_interface__`, or with `__dlpack__` on a device other than the CPU."""
    if isinstance(x, np.ndarray):
        return False
    x = without_grad(x)
    if protocol(x, "__cuda_array_interface__") is not None:
        return True
    dlpack_device = protocol(x, "__dlpack_device__")
    if protocol(x, "__dlpack__") is not None and dlpack_device is not None:
        return DEVICE_NAMES.get(int(dlpack_device()[0])) == "cuda"
    return False


def _contiguous(shape: tuple[int, ...], strides: tuple[int, ...] | None, itemsize: int) -> bool:
    """strides in bytes (None: C-contiguous by definition); size-1 axes may carry any stride."""
    if strides is None:
        return True
    expected = itemsize
    for size, stride in reversed(list(zip(shape, strides))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _dlpack_dtype(t: _DLDataType) -> np.dtype:
    kinds = {DLPACK_FLOAT: "f", DLPACK_INT: "i", DLPACK_UINT: "u"}
    if t.lanes != 1 or t.code not in kinds:
        raise ValueError(f"unsupported DLPack dtype (code {t.code}, {t.bits} bits, {t.lanes} lanes)")
    return np.dtype(f"{kinds[t.code]}{t.bits // 8}")


def from_dlpack(x: Any, stream: int | None = None) -> DeviceArrayView:
    """View `x` through `__dlpack__`. `stream`: the consumer's CUDA stream, on which the producer orders
    its pending writes before the memory is read (DLPack's contract); None leaves that to the caller."""
    capsule = x.__dlpack__(stream=stream) if stream is not None else x.__dlpack__()
    tensor = _DLTensor.from_address(_capsule_pointer(capsule, b"dltensor"))
    shape = tuple(tensor.shape[i] for i in range(tensor.ndim))
    dtype = _dlpack_dtype(tensor.dtype)
    strides = tuple(tensor.strides[i] * dtype.itemsize for i in range(tensor.ndim)) if tensor.strides else None
    if not _contiguous(shape, strides, dtype.itemsize):
        raise ValueError(f"a device array must be C-contiguous; got shape {shape} with strides {strides} (bytes)")
    device = DEVICE_NAMES.get(tensor.device.device_type)
    if device is None:
        raise ValueError(f"unsupported DLPack device type {tensor.device.device_type}")
    # The capsule owns the memory: dropping it runs the producer's deleter (the array stays referenced too).
    return DeviceArrayView((tensor.data or 0) + tensor.byte_offset, shape, dtype, device, tensor.device.device_id,
                           (capsule, x))


def from_cuda_array_interface(x: Any) -> DeviceArrayView:
    """View `x` through `__cuda_array_interface__` (versions 2 and 3). Its optional `stream` is the
    producer's (kept on the view): a reader waits for the writes pending on it."""
    cai = x.__cuda_array_interface__
    shape = tuple(int(d) for d in cai["shape"])
    dtype = np.dtype(cai["typestr"])
    if dtype.byteorder == ">":
        raise ValueError("big-endian device arrays are not supported")
    strides = tuple(cai["strides"]) if cai.get("strides") is not None else None
    if not _contiguous(shape, strides, dtype.itemsize):
        raise ValueError(f"a device array must be C-contiguous; got shape {shape} with strides {strides} (bytes)")
    if cai.get("mask") is not None:
        raise ValueError("masked device arrays are not supported")
    ptr = int(cai["data"][0] or 0)
    stream = cai.get("stream") if cai.get("version", 2) >= 3 else None
    return DeviceArrayView(ptr, shape, dtype.newbyteorder("="), "cuda", -1, x, int(stream) if stream else None)


def device_view(x: Any, stream: int | None = None) -> DeviceArrayView:
    """The device array `x` as a view; DLPack first (it carries the device id and orders the producer's
    writes on `stream`), else the CUDA array interface. A torch tensor that requires grad is viewed detached."""
    x = without_grad(x)
    if protocol(x, "__dlpack__") is not None and protocol(x, "__dlpack_device__") is not None:
        return from_dlpack(x, stream)
    if protocol(x, "__cuda_array_interface__") is not None:
        return from_cuda_array_interface(x)
    raise TypeError(f"{type(x).__name__} is not a device array (it has neither __dlpack__ nor __cuda_array_interface__)")
