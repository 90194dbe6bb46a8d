"""The torch backends: transformers' CLIPModel towers, built from the weights (not from ONNX).

`torch` is the model card's code path on the CPU (fp32; bf16 = autocast, what a CPU user tries first).
`torch-cuda` runs the towers on the GPU in fp16 or bf16 (or fp32 as the reference computes it: TF32 off
and SDPA's math kernel, inside each call only, the caller's settings given back after) and is the
baseline GPU numbers are compared against. Attention is transformers' SDPA (`use_sdpa`): on a GPU, fp16
and bf16 get the flash kernel where it applies (no mask: the vision tower; the text tower's causal mask
goes as is_causal) and the memory-efficient one otherwise.

Options (the registry declares them):
- `compile=True`: each tower through torch.compile (inductor; `CompiledTower`): one trace per tower for
  every batch size. On the CPU too (inductor's C++ backend): that is how CI tests it.
- `cuda_graphs=True` (torch-cuda): the vision tower replays one CUDA graph per batch bucket (powers of two
  up to the batch size; `BucketedTower`, `CudaGraphRunners`), a batch padded up to its bucket, with or
  without compile. Our own capture rather than torch.compile's mode="reduce-overhead": it works for the
  eager towers too (so graphs and compilation are measured apart), the buckets bound what is captured,
  and the output of a replay is cloned before the next one, which batches kept in flight need (the
  compiled mode's graphs overwrite their outputs on the next replay and skip graphs silently in cases it
  logs). The text tower has a second varying axis and is run once per prompt set: it is not graphed.
  Not run on a GPU yet.

Tensors already on the device are used as they are (no host round trip), detached (an RL loop's
generations carry gradients). This module imports torch; it is imported only when one of these backends
is chosen.

No process-wide torch setting is changed, so the reward can live in a trainer's process (colocated on its
GPU): grad mode, inference mode and autocast are entered per call and left; fp32 on the GPU gives the
caller's TF32 flags back after each call; scoring draws nothing from torch's RNG. One exception, asked for by name:
`threads=N` on the CPU backend `torch` calls torch.set_num_threads(N), which is process-wide (torch has no
per-model thread count), so it changes the threads of every torch computation in the process; without
`threads` (the default) it is left alone. `torch-cuda` ignores `threads` (its work is on the GPU) and
never calls it. tests/test_torch_state.py checks all of this on the CPU.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from ..artifacts import Artifacts
from ..buckets import batch_buckets
from ..device_arrays import is_device_array
from ..optional import export_tools
from ..torch_towers import (BucketedTower, CompiledTower, CudaGraphRunners, clip_specs, numerics,
                            tower_module, use_sdpa)
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
                 threads: int | None = None, compile: bool = False, cuda_graphs: bool = False):
        if precision not in DTYPES:
            raise ValueError(f"torch backends run {', '.join(DTYPES)}, not {precision!r}")
        self.name, self.precision, self.batch_size = name, precision, batch_size
        self.device = "cuda" if name == "torch-cuda" else "cpu"
        if cuda_graphs and self.device != "cuda":
            raise ValueError("cuda_graphs needs the GPU: backend torch-cuda")
        self.specs = clip_specs(clip)  # what BackendBase checks inputs against: the towers' own dims
        if threads and self.device == "cpu":  # process-wide (torch has no per-model threads): only when asked
            torch.set_num_threads(threads)
        self._numerics = numerics(self.device, precision)  # fp32 on the GPU: the reference's arithmetic, per call
        use_sdpa(clip)
        if self.device == "cuda":
            clip = clip.to("cuda", dtype=DTYPES[precision])  # fp16/bf16 weights run natively
            self.queue_depth = 2  # kernels are queued: the next batch's copy overlaps this one's compute
            self._input_dtype, self._autocast = DTYPES[precision], None
        else:
            self._input_dtype = torch.float32
            self._autocast = None if precision == "fp32" else DTYPES[precision]
        self._towers = {t: tower_module(clip, t) for t in ("text", "vision")}
        if compile:
            self._towers = {t: CompiledTower(m, self.specs[t].input) for t, m in self._towers.items()}
        if cuda_graphs:
            self._towers["vision"] = BucketedTower(self._towers["vision"], batch_buckets(batch_size),
                                                   CudaGraphRunners())

    def _run(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast("cpu", dtype=self._autocast) if self._autocast else contextlib.nullcontext()
        with torch.inference_mode(), self._numerics, autocast:
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
        """pixel_values as the tensor the tower runs on, detached from any autograd graph. A tensor already on
        this device in the compute dtype is used as it is (no copy); any other device array (CuPy, JAX:
        __dlpack__ or __cuda_array_interface__) is wrapped without a copy first; only a dtype or device
        change copies (float32 input to an fp16 or bf16 tower on the GPU)."""
        return as_tensor(pixel_values).detach().to(self.device, dtype=self._input_dtype, non_blocking=True)

    def synchronize(self) -> None:
        """Wait for the caller's current CUDA stream, where this backend queues all its work (copies, towers,
        graph replays): not for the whole device, so a trainer's kernels on streams of its own are not waited
        for (bench --colocate times the reward beside them)."""
        if self.device == "cuda":
            torch.cuda.current_stream().synchronize()

    def close(self) -> None:
        self._towers = {}
        if self.device == "cuda":
            torch.cuda.empty_cache()


def create(artifacts: Artifacts, name: str, precision: str, batch_size: int, threads: int | None = None,
           model_source: Any = None, clip: Any = None, compile: bool | None = None,
           cuda_graphs: bool | None = None) -> TorchBackend:
    """clip: an already loaded CLIPModel; else the weights of `model_source`, else of the artifacts' own
    source (their manifest records it: hub id, local folder, or random-init seed). compile, cuda_graphs:
    see the module's docstring (None: off)."""
    if clip is None:
        tools = export_tools("the torch backends", needs=("torch", "transformers"), extra="torch")
        clip = tools.load_clip(model_source or tools.source_from_manifest(artifacts.manifest))
    return TorchBackend(clip, name, precision, batch_size, threads, bool(compile), bool(cuda_graphs))
