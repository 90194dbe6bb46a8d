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
from .base import BackendBase

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def features(output: Any) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and a BaseModelOutputWithPooling in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True)  # as the model card writes it


class ClipTower(torch.nn.Module):
    """One tower with the runtime's IO contract: text input_ids [B, T] (pooled at argmax(input_ids), the
    first <|endoftext|>) or vision pixel_values [B, 3, S, S] -> L2-normalised embeddings [B, D], normalised
    in float32 whatever the compute precision."""

    def __init__(self, clip: Any, tower: str):
        super().__init__()
        if tower not in ("text", "vision"):
            raise ValueError(f"tower must be 'text' or 'vision', got {tower!r}")
        self.clip, self.tower = clip, tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.clip.get_text_features(input_ids=x) if self.tower == "text" else self.clip.get_image_features(pixel_values=x)
        return l2_normalise(features(out).float())


def tower_module(clip: Any, tower: str) -> ClipTower:
    return ClipTower(clip, tower).eval()


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

    def embed_text(self, input_ids: np.ndarray) -> np.ndarray:
        return _PendingTensor(self._run("text", torch.from_numpy(np.asarray(input_ids)).to(self.device))).result()

    def embed_images(self, pixel_values: Any) -> np.ndarray:
        return self.submit_images(pixel_values).result()

    def submit_images(self, pixel_values: Any) -> _PendingTensor:
        return _PendingTensor(self._run("vision", self.input_tensor(pixel_values)))

    def input_tensor(self, pixel_values: Any) -> torch.Tensor:
        """pixel_values as the tensor the tower runs on. A tensor already on this device in the compute
        dtype is used as it is (no copy); any other device array (CuPy, JAX: __dlpack__ or
        __cuda_array_interface__) is wrapped without a copy first; only a dtype or device change copies."""
        if isinstance(pixel_values, torch.Tensor):
            x = pixel_values
        elif is_device_array(pixel_values):
            x = torch.from_dlpack(pixel_values) if hasattr(pixel_values, "__dlpack__") else torch.as_tensor(pixel_values, device="cuda")
        else:
            x = torch.from_numpy(np.asarray(pixel_values))
        return x.to(self.device, dtype=self._input_dtype, non_blocking=True)

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def close(self) -> None:
        self._towers = {}
        if self.device == "cuda":
            torch.cuda.empty_cache()


def create(artifacts: Artifacts, name: str, precision: str, batch_size: int, threads: int | None = None,
                 model_source: Any = None, clip: Any = None, **_: object) -> TorchBackend:
    """clip: an already loaded CLIPModel; else the weights of `model_source`, else of the artifacts' own
    source (their manifest records it: hub id, local folder, or random-init seed)."""
    if clip is None:
        tools = export_tools("the torch backends", needs=("torch", "transformers"), extra="torch")
        clip = tools.load_clip(model_source or tools.source_from_manifest(artifacts.manifest))
    return TorchBackend(clip, name, precision, batch_size, threads)
