"""The torch backends: transformers' CLIPModel towers, built from the weights (not from ONNX).

`torch` is the model card's code path on the CPU (fp32; bf16 = autocast, what a CPU user tries first).
`torch-cuda` runs the towers on the GPU in fp16 or bf16 (or fp32 with TF32 off) with transformers' default attention
(SDPA where torch has it, as here: config._attn_implementation), and
is the baseline GPU numbers are compared against. This module imports torch; it is imported only when
one of these backends is chosen.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from ..artifacts import Artifacts
from ..device_arrays import is_device_array
from ..optional import export_tools
from ..torch_towers import clip_specs, tower_module
from .base import BackendBase

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def as_tensor(x: Any) -> torch.Tensor:
    """A torch tensor of `x` (numpy, a tensor, a device array), without a copy."""
    if isinstance(x, torch.Tensor):
        return x
    if is_device_array(x):
        return torch.from_dlpack(x) if hasattr(x, "__dlpack__") else torch.as_tensor(x, device="cuda")
    return torch.from_numpy(np.asarray(x))


class _PendingTensor:
    def __init__(self, tensor: torch.Tensor):
        self._tensor = tensor

    def result(self) -> np.ndarray:
        return self._tensor.float().cpu().numpy()  # waits for the GPU's queue to reach this batch


class TorchBackend(BackendBase):
    def __init__(self, clip: Any, name: str = "torch", precision: str = "fp32", batch_size: int = 8,
                 threads: int | None = None):
        if precision not in DTYPES:
            raise ValueError(f"torch backends run {', '.join(DTYPES)}, not {precision!r}")
        self.name, self.precision, self.batch_size = name, precision, batch_size
        self.device = "cuda" if name == "torch-cuda" else "cpu"
        self.specs = clip_specs(clip)  # what BackendBase checks inputs against: the towers' own dims
        if threads:
            torch.set_num_threads(threads)
        if self.device == "cuda":
            # fp32 must mean fp32 (the reference); fp16/bf16 weights run natively, SDPA picks fused kernels.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            clip = clip.to("cuda", dtype=DTYPES[precision])
            self.queue_depth = 2  # kernels are queued: the next batch's copy overlaps this one's compute
            self._input_dtype, self._autocast = DTYPES[precision], None
        else:
            self._input_dtype = torch.float32
            self._autocast = None if precision == "fp32" else DTYPES[precision]
        self._towers = {t: tower_module(clip, t) for t in ("text", "vision")}

    def _run(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast("cpu", dtype=self._autocast) if self._autocast else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return self._towers[tower](x)

    # ---- inputs: numpy, torch tensors on any device, other device arrays (checked by BackendBase) ----
    def _takes(self, tower: str, x: Any) -> bool:
        return isinstance(x, torch.Tensor) or is_device_array(x)

    def _also_takes(self, tower: str) -> str:
        return " or a torch tensor (or an array with __dlpack__ / __cuda_array_interface__)"

    def _infer_text(self, input_ids: Any) -> np.ndarray:
        return _PendingTensor(self._run("text", as_tensor(input_ids).to(self.device))).result()

    def _infer_images(self, pixel_values: Any) -> np.ndarray:
        return self._submit_images(pixel_values).result()

    def _submit_images(self, pixel_values: Any) -> _PendingTensor:
        return _PendingTensor(self._run("vision", self.input_tensor(pixel_values)))

    def input_tensor(self, pixel_values: Any) -> torch.Tensor:
        """pixel_values as the tensor the tower runs on. A tensor already on this device in the compute
        dtype is used as it is (no copy); any other device array (CuPy, JAX: __dlpack__ or
        __cuda_array_interface__) is wrapped without a copy first; only a dtype or device change copies
        (float32 input to an fp16 or bf16 tower on the GPU)."""
        return as_tensor(pixel_values).to(self.device, dtype=self._input_dtype, non_blocking=True)

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def close(self) -> None:
        self._towers = {}
        if self.device == "cuda":
            torch.cuda.empty_cache()


def create(artifacts: Artifacts, name: str, precision: str, batch_size: int, threads: int | None = None,
                 model_source: Any = None, clip: Any = None) -> TorchBackend:
    """clip: an already loaded CLIPModel; else the weights of `model_source`, else of the artifacts' own
    source (their manifest records it: hub id, local folder, or random-init seed)."""
    if clip is None:
        tools = export_tools("the torch backends", needs=("torch", "transformers"), extra="torch")
        clip = tools.load_clip(model_source or tools.source_from_manifest(artifacts.manifest))
    return TorchBackend(clip, name, precision, batch_size, threads)
