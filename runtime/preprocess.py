"""Image preprocessing identical to transformers' CLIPImageProcessor (PIL backend, the processor the
PickScore model card uses): RGB conversion compositing transparency onto white, shortest side to 224
with PIL bicubic (long side truncated to int), centre crop 224 at ((h-224)//2, (w-224)//2), x/255 in
float64 then float32, (x - mean) / std in float32, CHW."""

from __future__ import annotations

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
        cfg = cls(
            int(d["shortest_edge"]), int(d["crop_size"]), str(d["resample"]), float(d["rescale_factor"]),
            tuple(float(v) for v in d["image_mean"]), tuple(float(v) for v in d["image_std"]),
        )
        if cfg.resample not in _RESAMPLE:
            raise ValueError(f"unsupported resample {cfg.resample!r}; supported: {sorted(_RESAMPLE)}")
        if cfg.crop_size > cfg.shortest_edge:
            raise ValueError("crop_size larger than shortest_edge would need padding, which CLIP never does")
        return cfg

    def to_json(self) -> dict[str, Any]:
        return {
            "shortest_edge": self.shortest_edge, "crop_size": self.crop_size, "resample": self.resample,
            "rescale_factor": self.rescale_factor, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
        }


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
