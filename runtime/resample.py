"""PIL's bicubic resize, reproduced exactly, as matrices that act on a batch on any array library's device.

Pillow resamples in two passes, one per axis (horizontal first, except that Pillow 13 and later run the
vertical pass first when the height shrinks by more than twice as many pixels as the width: see
`horizontal_first`). Each output pixel is a weighted sum of the
input pixels under the filter's support, with the weights normalised to 1, turned into fixed-point
integers of PRECISION_BITS, summed with a rounding offset, shifted back and clipped to 0..255 (so the
intermediate image is 8-bit too). `pil_weights` rebuilds those integer weights (Pillow's
precompute_coeffs + normalize_coeffs_8bpc) as a dense [out, in] matrix; `resample_axis` applies one pass.
The sums are integers below 2**53, so float64 arithmetic is exact: the result equals Pillow's bit for bit
(a test checks it against PIL on many sizes). Dense matrices cost more multiplies than Pillow's sparse
taps, so on a CPU Pillow itself stays the exact path; on a GPU this is what `exact` mode runs.
"""

from __future__ import annotations

import numpy as np

PRECISION_BITS = 32 - 8 - 2
BICUBIC_SUPPORT = 2.0


def bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5)."""
    a = -0.5
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                    np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def pil_weights(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's fixed-point bicubic weights for resizing one axis from in_size to out_size: [out, in] int64."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    weights = np.zeros((out_size, in_size), np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        taps = bicubic((np.arange(xmin, xmax) - center + 0.5) * (1.0 / filterscale))  # as C: times the inverse
        total = taps.sum()
        if total != 0.0:
            taps = taps / total
        fixed = taps * (1 << PRECISION_BITS)
        # C's (int)(x + 0.5) and (int)(x - 0.5): rounding half away from zero, by truncation
        weights[xx, xmin:xmax] = np.where(taps < 0, np.trunc(fixed - 0.5), np.trunc(fixed + 0.5)).astype(np.int64)
    return weights


def horizontal_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Which pass Pillow runs first. The intermediate image is 8-bit, so the order changes the result."""
    from PIL import __version__ as pillow_version

    if int(pillow_version.split(".")[0]) < 13:
        return True
    shrink_h, shrink_w = in_h - out_h, in_w - out_w
    return not (shrink_h > 0 and shrink_h > shrink_w * 2)  # Pillow 13's Resample.c, verbatim in meaning


def resample_axis(xp, pixels, weights, axis: int):
    """One Pillow pass along `axis` of a uint8-valued float64 array: sum, round, shift, clip to 0..255.
    `xp` is the array namespace (numpy, or torch); `weights` an [out, in] float64 array of that library."""
    moved = xp.moveaxis(pixels, axis, -1)
    acc = moved @ weights.T + float(1 << (PRECISION_BITS - 1))
    out = xp.clip(xp.floor(acc / float(1 << PRECISION_BITS)), 0.0, 255.0)
    return xp.moveaxis(out, -1, axis)


def output_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """CLIP's resize target: the short side to shortest_edge, the long side scaled and truncated to int."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)


def crop_box(size: tuple[int, int], crop: int) -> tuple[int, int]:
    """(top, left) of the centre crop, as CLIPImageProcessor computes it."""
    w, h = size
    return (h - crop) // 2, (w - crop) // 2
