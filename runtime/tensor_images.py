"""Images that are already tensors (an RL loop's generations): a batch in numpy, torch (CPU or CUDA) or
anything with DLPack; uint8 or float in [0, 1]; NCHW or NHWC; any size -> CLIP pixels [N, 3, S, S]
float32, on the device the batch lives on.

Two modes:
- `exact`: quantise to uint8 as the trainers do before saving or scoring an image: `(x * 255).round()`, or,
  with quantize="truncate", `(x * 255).to(uint8)`, in the batch's own dtype as they compute it (a bf16
  batch's product is a bf16), then follow PIL's arithmetic:
  its fixed-point bicubic resize with an 8-bit intermediate (resample.py), centre crop, x / 255 in
  float64, normalise. Scores equal the file path's (a PNG of the same pixels) within fp32 tolerance. On
  the host the resize is PIL itself; on a GPU the same integer arithmetic runs as float64 matrices.
- `fast`: float bicubic with antialias on the device (torch's interpolate), no uint8 round trip; its
  effect on scores is measured in the README.

Torch is imported only when the batch is a torch tensor (or a DLPack array on a GPU). A tensor that
requires grad (an RL loop's generations) is read detached, and its preprocessing records no graph.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .device_arrays import is_torch_tensor
from .errors import ImageError
from .preprocess import PreprocessConfig, Preprocessor
from .resample import crop_box, horizontal_first, output_size, pil_weights, resample_axis

MODES = ("exact", "fast")
QUANTIZE = ("round", "truncate")  # float -> uint8: (x * 255).round() (as saved), or (x * 255).to(uint8)
TORCH_CHUNK = 16
LAYOUTS = ("auto", "NCHW", "NHWC")
WEIGHT_CACHE_SIZE = 16  # crop_weights entries: two per image size (and device); crop x size float64 (1.8 MB at 1024 px)


def is_tensor_batch(images: Any) -> bool:
    """A batch given as one array (4-D numpy, a torch tensor, anything with __dlpack__), not a list of images."""
    if isinstance(images, np.ndarray):
        return images.ndim == 4
    return is_torch_tensor(images) or hasattr(images, "__dlpack__")


def _as_native(images: Any) -> Any:
    """numpy stays numpy; torch stays torch (checked readable, detached); other DLPack producers become torch
    (GPU) or numpy (host)."""
    if isinstance(images, np.ndarray):
        return images
    if is_torch_tensor(images):
        return readable_tensor(images)
    device = images.__dlpack_device__()[0] if hasattr(images, "__dlpack_device__") else 1
    if device == 1:  # kDLCPU
        return np.from_dlpack(images)
    from .optional import require

    return readable_tensor(require("torch", "images on a GPU given through DLPack").from_dlpack(images))


def readable_tensor(tensor: Any) -> Any:
    """`tensor` detached, after refusing the kinds whose pixels cannot be read as a dense array: torch would
    fail deep inside preprocessing with a message that names neither the batch nor the fix."""
    import torch

    if tensor.device.type == "meta":
        raise ImageError("batch", "tensor on device 'meta' has no data (materialise it first, e.g. torch.empty_like(t, "
                                  "device='cpu'), or pass the real generations)")
    if tensor.is_nested or tensor.layout != torch.strided:
        kind = "nested" if tensor.is_nested else str(tensor.layout).removeprefix("torch.")
        raise ImageError("batch", f"a {kind} tensor has no dense pixels; pass a dense one (t.to_dense())")
    return tensor.detach()


def channels_last(shape: tuple[int, ...], layout: str) -> bool:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout != "auto":
        return layout == "NHWC"
    first, last = shape[1] in (1, 3), shape[3] in (1, 3)
    if not first and not last:
        raise ImageError("batch", f"images must have 1 or 3 channels, in axis 1 (NCHW) or axis 3 (NHWC); got shape "
                                  f"{tuple(shape)} (composite an alpha channel first)")
    if first == last:
        raise ImageError("batch", f"cannot tell NCHW from NHWC for shape {tuple(shape)}; pass layout='NCHW' or 'NHWC'")
    return last


def batch_length(batch: Any) -> int:
    """How many images a batch array holds; ImageError unless it is 4-D (an image batch has no other rank)."""
    shape = tuple(batch.shape)
    if len(shape) != 4:
        raise ImageError("batch", f"expected a 4-D batch (N, C, H, W or N, H, W, C), got shape {shape}")
    return int(shape[0])


def checked_layout(batch: Any, layout: str, preprocessor: Preprocessor | None = None) -> bool:
    """Whether a 4-D batch is channels-last, after refusing shapes no image batch has, and, with a
    `preprocessor`, a size whose resize would need gigabytes (its aspect-ratio check): from the shape alone,
    before anything is allocated, the same for numpy as for torch."""
    batch_length(batch)
    nhwc = channels_last(tuple(batch.shape), layout)
    n, c = batch.shape[0], batch.shape[3] if nhwc else batch.shape[1]
    h, w = (batch.shape[1], batch.shape[2]) if nhwc else (batch.shape[2], batch.shape[3])
    if n == 0:
        raise ImageError("batch", "the batch is empty")
    if c not in (1, 3):
        raise ImageError("batch", f"images must have 1 or 3 channels, got {c} (composite an alpha channel first)")
    if h < 1 or w < 1:
        raise ImageError("batch", f"images have no pixels ({w}x{h})")
    if preprocessor is not None:
        preprocessor.check_size(int(w), int(h), f"batch of shape {tuple(int(d) for d in batch.shape)}")
    return nhwc


def check_values(xp: Any, batch: Any, integer: bool) -> None:
    """Float images must be finite and in [0, 1]; the error names the first bad one."""
    flat = batch.reshape(batch.shape[0], -1)
    if integer:
        return
    bad = ~xp.isfinite(flat).all(1) if xp is np else ~flat.isfinite().all(1)
    if bad.any():
        raise ImageError(f"#{int(xp.nonzero(bad)[0][0])} (tensor)", "holds NaN or infinite values")
    low, high = (flat.min(1), flat.max(1)) if xp is np else (flat.amin(1), flat.amax(1))
    out = (low < 0) | (high > 1)
    if out.any():
        i = int(xp.nonzero(out)[0][0])
        raise ImageError(f"#{i} (tensor)", f"float images must be in [0, 1]; this one spans [{float(low[i]):.4g}, "
                                           f"{float(high[i]):.4g}] (pass uint8, or scale it)")


def check_quantize(quantize: str, mode: str = "exact") -> None:
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    if quantize == "truncate" and mode != "exact":
        raise ValueError("quantize='truncate' needs mode='exact': the fast mode has no uint8 step to truncate in")


def quantised(batch: Any, quantize: str) -> Any:
    """A float batch in [0, 1] (checked) as uint8, numpy or torch: `(x * 255).round()` or, truncating,
    `(x * 255)` cast to uint8, both in the batch's own dtype, as trainers write it."""
    if isinstance(batch, np.ndarray):
        scaled = batch * batch.dtype.type(255)
        return (np.rint(scaled) if quantize == "round" else scaled).astype(np.uint8)
    import torch

    scaled = batch * 255
    return (scaled.round() if quantize == "round" else scaled).to(torch.uint8)


def quantised_nhwc(batch: np.ndarray, nhwc: bool, quantize: str = "round") -> np.ndarray:
    """A host batch as checked uint8 NHWC: exact mode's first step (what PIL would have been given)."""
    check_quantize(quantize)
    integer = batch.dtype == np.uint8
    if not integer and not np.issubdtype(batch.dtype, np.floating):
        raise ImageError("batch", f"images must be uint8 or float in [0, 1], got dtype {batch.dtype}")
    check_values(np, batch, integer)
    if not nhwc:
        batch = batch.transpose(0, 2, 3, 1)
    return batch if integer else quantised(batch, quantize)


def host_uint8_batch(images: Any, layout: str = "auto", quantize: str = "round") -> np.ndarray:
    """Any tensor batch (numpy, torch on any device, DLPack) as checked host uint8 NHWC, quantised as
    exact mode quantises: what a client sends to a server so that both ends score the same pixels."""
    check_quantize(quantize)
    batch = _as_native(images)
    if is_torch_tensor(batch):
        import torch

        nhwc = checked_layout(batch, layout)
        if batch.dtype != torch.uint8:
            if not batch.is_floating_point():
                raise ImageError("batch", f"images must be uint8 or float in [0, 1], got dtype {batch.dtype}")
            with torch.no_grad():
                check_values(torch, batch, False)
                batch = quantised(batch, quantize)  # on its device, in its dtype
        return (batch if nhwc else batch.permute(0, 2, 3, 1)).cpu().contiguous().numpy()
    return quantised_nhwc(batch, checked_layout(batch, layout), quantize)


class TensorPreparer:
    """Batch -> pixels, for one preprocessing config (the artifacts')."""

    def __init__(self, config: PreprocessConfig):
        if config.resample != "bicubic":
            raise ValueError("tensor preprocessing reproduces bicubic resizing only")
        self.config = config
        self._pil = Preprocessor(config)

    def __call__(self, images: Any, mode: str = "exact", layout: str = "auto", quantize: str = "round") -> Any:
        """[N, 3, S, S] float32: numpy for host input, a torch tensor on the input's device for torch input.
        quantize: how exact mode turns float pixels into uint8 (QUANTIZE)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_quantize(quantize, mode)
        batch = _as_native(images)
        nhwc, n = checked_layout(batch, layout, self._pil), batch.shape[0]
        if is_torch_tensor(batch):
            import torch

            integer = batch.dtype == torch.uint8
            if not integer and not batch.is_floating_point():
                raise ImageError("batch", f"images must be uint8 or float in [0, 1], got dtype {batch.dtype}")
            with torch.no_grad():  # not inference_mode: its tensors could not enter the caller's autograd later
                check_values(torch, batch, integer)
                # float64 intermediates: bound the memory of a large batch of large images
                return torch.cat([self._torch(batch[i:i + TORCH_CHUNK], nhwc, mode, integer, quantize)
                                  for i in range(0, n, TORCH_CHUNK)])
        return self._numpy(batch, nhwc, mode, quantize)

    # ---- host ---------------------------------------------------------------------------------
    def _numpy(self, batch: np.ndarray, nhwc: bool, mode: str, quantize: str) -> np.ndarray:
        u8 = quantised_nhwc(batch, nhwc, quantize)
        if u8.shape[3] == 1:
            u8 = u8[..., 0]
        from PIL import Image

        # On the host PIL is the exact arithmetic (and the fastest per core); `fast` uses its reducing gap.
        gap = None if mode == "exact" else 2.0
        return np.stack([self._pil(Image.fromarray(np.ascontiguousarray(img)), f"#{i} (tensor)", reducing_gap=gap)
                         for i, img in enumerate(u8)])

    # ---- torch (CPU or GPU) -------------------------------------------------------------------
    def _torch(self, batch: Any, nhwc: bool, mode: str, integer: bool, quantize: str) -> Any:
        import torch

        x = batch.permute(0, 3, 1, 2) if nhwc else batch
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        cfg = self.config
        h, w = int(x.shape[2]), int(x.shape[3])
        tw, th = output_size(w, h, cfg.shortest_edge)
        top, left = crop_box((tw, th), cfg.crop_size)
        if mode == "exact":
            x = (x if integer else quantised(x, quantize)).to(torch.float64)
            # Pillow's two passes in Pillow's order, each computing only the rows / columns the crop keeps.
            passes = [(3, w, tw, left), (2, h, th, top)]
            for axis, size, target, start in passes if horizontal_first(w, h, tw, th) else passes[::-1]:
                if target != size:
                    x = resample_axis(torch, x, crop_weights(size, target, start, cfg.crop_size, x.device), axis)
                else:
                    x = x.narrow(axis, start, cfg.crop_size)
            x = (x * cfg.rescale_factor).to(torch.float32)
        else:
            x = x.to(torch.float32) / 255.0 if integer else x.to(torch.float32)
            x = torch.nn.functional.interpolate(x, size=(th, tw), mode="bicubic", antialias=True, align_corners=False)
            x = x[..., top:top + cfg.crop_size, left:left + cfg.crop_size].clamp(0.0, 1.0)
        mean = torch.tensor(cfg.image_mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.image_std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()


@functools.lru_cache(maxsize=WEIGHT_CACHE_SIZE)
def crop_weights(size: int, target: int, start: int, length: int, device: Any) -> Any:
    """PIL's weights for resizing an axis of `size` pixels to `target`, only the `length` rows from `start`
    that the crop keeps, as a float64 tensor on `device`: made and uploaded once per shape, not once per
    chunk and pass. Shared, so read-only. A blocking `.to` has finished the upload when it returns, so a
    chunk on any stream may read it."""
    import torch

    return torch.from_numpy(pil_weights(size, target)[start:start + length].astype(np.float64)).to(device)
