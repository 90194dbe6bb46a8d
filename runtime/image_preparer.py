"""The image stage: one item (path, bytes, PIL image, uint8 array) -> float32 pixels [3, S, S] exactly as
the reference preprocesses it, or a per-item error that names it. Safe to call from many threads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ImageError
from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageInput, PixelBudget, check_pixels, decode, image_name, open_lazily
from .preprocess import Preprocessor
from .resample import output_size


@dataclass(frozen=True)
class PreparedImage:
    name: str
    pixels: np.ndarray | None  # float32 [3, S, S], or None when `error` says why not
    error: ImageError | None = None


class ImagePreparer:
    def __init__(self, preprocessor: Preprocessor, apply_exif_orientation: bool = False,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, pixel_budget: int | None = None,
                 jpeg_draft: bool = False, reducing_gap: float | None = None):
        """max_image_pixels: larger images are refused by name. pixel_budget: decoded pixels held at once
        by all threads using this preparer (default twice the largest image).

        Opt-in fast decoding, not the reference's arithmetic (their effect on scores: README):
        jpeg_draft: decode a JPEG much larger than needed at 1/2, 1/4 or 1/8 scale in the DCT domain (PIL's
        draft), never below the size the resize needs. reducing_gap: PIL first shrinks by an integer
        factor with a box filter while the image stays reducing_gap times larger than the target."""
        self.preprocessor = preprocessor
        self.apply_exif_orientation = apply_exif_orientation
        self.max_image_pixels = max_image_pixels
        self.budget = PixelBudget(pixel_budget or 2 * max_image_pixels)
        self.jpeg_draft, self.reducing_gap = jpeg_draft, reducing_gap

    @property
    def exact(self) -> bool:
        return not self.jpeg_draft and self.reducing_gap is None

    def __call__(self, item: ImageInput, name: str) -> np.ndarray:
        """Pixels of one image; raises ImageError naming `name`."""
        img = open_lazily(item, name)
        pixels = check_pixels(img, name, self.max_image_pixels)
        self.preprocessor.check_size(*img.size, name)
        if self.jpeg_draft and img.format == "JPEG" and not self.apply_exif_orientation:
            # draft() keeps at least the requested size: ask for what the resize will produce
            img.draft("RGB", output_size(*img.size, self.preprocessor.config.shortest_edge))
            pixels = img.size[0] * img.size[1]
        with self.budget.hold(pixels):
            return self.preprocessor(decode(img, name, self.apply_exif_orientation), name, reducing_gap=self.reducing_gap)

    def prepare(self, item: ImageInput, index: int = 0) -> PreparedImage:
        """Like calling the preparer, but every failure becomes the item's error instead of an exception."""
        name = image_name(item, index)
        try:
            return PreparedImage(name, self(item, name))
        except ImageError as e:
            return PreparedImage(name, None, e)
        except Exception as e:  # noqa: BLE001 - an unforeseen decoder failure is still one bad image
            return PreparedImage(name, None, ImageError(name, f"unexpected {type(e).__name__}: {e}"))
