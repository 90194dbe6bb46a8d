"""Image preprocessing identical to transformers' CLIPImageProcessor (PIL backend, the processor the
PickScore model card uses): RGB conversion compositing transparency onto white, shortest side to 224
with PIL bicubic (long side truncated to int), centre crop 224 at ((h-224)//2, (w-224)//2), x/255 in
float64 then float32, (x - mean) / std in float32, CHW."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .errors import ImageError
from .resample import crop_box, output_size

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
# The resized intermediate of an extreme aspect ratio (say 100000x1) would need gigabytes; the
# reference would try anyway and exhaust memory. Refuse such images by name instead.
MAX_RESIZED_PIXELS = 64_000_000
MAX_SIDE = 8192  # shortest_edge and crop_size: a tower's input side is a few hundred pixels


@dataclass(frozen=True)
class PreprocessConfig:
    shortest_edge: int
    crop_size: int
    resample: str
    rescale_factor: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "PreprocessConfig":
        """The config a manifest (or preprocessor_config.json, as read by export) records; ValueError naming
        the first field that is missing, of the wrong type or out of range, so a corrupted manifest is refused
        at load rather than scoring NaN (a zero std) or failing per image (a zero crop)."""
        if not isinstance(d, dict):
            raise ValueError(f"is {type(d).__name__}, expected an object")
        missing = [k for k in ("shortest_edge", "crop_size", "resample", "rescale_factor", "image_mean", "image_std")
                   if k not in d]
        if missing:
            raise ValueError(f"{missing[0]} is missing")
        cfg = cls(_whole(d, "shortest_edge"), _whole(d, "crop_size"), d["resample"], _positive(d, "rescale_factor"),
                  _channels(d, "image_mean", positive=False), _channels(d, "image_std", positive=True))
        if not isinstance(cfg.resample, str) or cfg.resample not in _RESAMPLE:
            raise ValueError(f"resample is {cfg.resample!r}; supported: {sorted(_RESAMPLE)}")
        if cfg.crop_size > cfg.shortest_edge:
            raise ValueError(f"crop_size {cfg.crop_size} is larger than shortest_edge {cfg.shortest_edge}: that would "
                             "need padding, which CLIP never does")
        return cfg

    def to_json(self) -> dict[str, Any]:
        return {
            "shortest_edge": self.shortest_edge, "crop_size": self.crop_size, "resample": self.resample,
            "rescale_factor": self.rescale_factor, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
        }


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(d: dict[str, Any], key: str) -> int:
    value = d[key]
    if not _number(value) or value != int(value) or not 1 <= value <= MAX_SIDE:
        raise ValueError(f"{key} is {value!r}, expected a whole number of pixels in [1, {MAX_SIDE}]")
    return int(value)


def _positive(d: dict[str, Any], key: str) -> float:
    value = d[key]
    if not _number(value) or value <= 0:
        raise ValueError(f"{key} is {value!r}, expected a finite number > 0")
    return float(value)


def _channels(d: dict[str, Any], key: str, positive: bool) -> tuple[float, float, float]:
    """One finite value per RGB channel (a std also > 0: pixels are divided by it)."""
    value = d[key]
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(map(_number, value)) \
            or (positive and min(value) <= 0):
        raise ValueError(f"{key} is {value!r}, expected 3 finite numbers (one per RGB channel)"
                         + (", each > 0" if positive else ""))
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def to_rgb(img: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: alpha (a band, or palette/`transparency` info) composited onto white."""
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class Preprocessor:
    def __init__(self, config: PreprocessConfig):
        self.config = config
        self._mean = np.array(config.image_mean, dtype=np.float32)
        self._std = np.array(config.image_std, dtype=np.float32)
        self._resample = _RESAMPLE[config.resample]

    def check_size(self, width: int, height: int, name: str = "image") -> tuple[int, int]:
        """The resized size of a width x height image; ImageError if its aspect ratio is too extreme.
        Known from the header, so an image is refused before its pixels are decoded."""
        size = output_size(width, height, self.config.shortest_edge)
        if size[0] * size[1] > MAX_RESIZED_PIXELS:
            raise ImageError(name, f"aspect ratio of {width}x{height} is too extreme to preprocess "
                                   f"(max {MAX_RESIZED_PIXELS} px after resize)")
        return size

    def __call__(self, img: Image.Image, name: str = "image", reducing_gap: float | None = None) -> np.ndarray:
        """One decoded image -> float32 [3, crop, crop]. reducing_gap (not the reference's): PIL first
        shrinks by an integer factor with a box filter, then resamples; faster, no longer exact."""
        cfg = self.config
        try:
            rgb = to_rgb(img)
        except (OSError, ValueError) as e:
            raise ImageError(name, f"cannot convert mode {img.mode} to RGB ({e})") from None
        size = self.check_size(*rgb.size, name)
        pixels = np.asarray(rgb.resize(size, resample=self._resample, reducing_gap=reducing_gap))
        top, left = crop_box(size, cfg.crop_size)
        pixels = pixels[top : top + cfg.crop_size, left : left + cfg.crop_size]
        x = (pixels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
        x = (x - self._mean) / self._std
        return x.transpose(2, 0, 1)
