"""The image stage: one item (path, bytes, PIL image, uint8 array) -> float32 pixels [3, S, S] exactly as
the reference preprocesses it, or a per-item error that names it. Safe to call from many threads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ImageError
from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageInput, PixelBudget, check_pixels, decode, image_name, open_lazily
from .preprocess import Preprocessor


@dataclass(frozen=True)
class PreparedImage:
    name: str
    pixels: np.ndarray | None  # float32 [3, S, S], or None when `error` says why not
    error: ImageError | None = None


class ImagePreparer:
    def __init__(self, preprocessor: Preprocessor, apply_exif_orientation: bool = False,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, pixel_budget: int | None = None):
        """max_image_pixels: larger images are refused by name. pixel_budget: decoded pixels held at once
        by all threads using this preparer (default twice the largest image)."""
        self.preprocessor = preprocessor
        self.apply_exif_orientation = apply_exif_orientation
        self.max_image_pixels = max_image_pixels
        self.budget = PixelBudget(pixel_budget or 2 * max_image_pixels)

    def __call__(self, item: ImageInput, name: str) -> np.ndarray:
        """Pixels of one image; raises ImageError naming `name`."""
        img = open_lazily(item, name)
        with self.budget.hold(check_pixels(img, name, self.max_image_pixels)):
            return self.preprocessor(decode(img, name, self.apply_exif_orientation), name)

    def prepare(self, item: ImageInput, index: int = 0) -> PreparedImage:
        """Like calling the preparer, but every failure becomes the item's error instead of an exception."""
        name = image_name(item, index)
        try:
            return PreparedImage(name, self(item, name))
        except ImageError as e:
            return PreparedImage(name, None, e)
        except Exception as e:  # noqa: BLE001 - an unforeseen decoder failure is still one bad image
            return PreparedImage(name, None, ImageError(name, f"unexpected {type(e).__name__}: {e}"))
