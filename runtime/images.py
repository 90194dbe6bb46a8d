"""Turning one user-supplied image (path, bytes, PIL image, numpy array) into a decoded PIL image, with
an `ImageError` that names the item for anything that cannot be used.

Encoded images are opened in two steps, so that their size is known (and refused when over the pixel
limit) before any pixel is decoded: `open_lazily` reads the header, `decode` reads the pixels.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import threading
from pathlib import Path
from typing import Iterator, Union

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError

ImageInput = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]

# 8192 x 8192. Generators produce <= 4096^2; a bigger image is far more likely a decompression bomb
# or a mistake, and costs ~200 MB per decoding worker. Configurable (`max_image_pixels`).
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192

# Only raster formats Pillow decodes itself. EPS/PS would run Ghostscript (an external program a looping
# file keeps busy forever), and no image generator writes the others Pillow can open.
RASTER_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")


def image_name(item: object, index: int) -> str:
    """How results and errors refer to an input: its path, else its position and kind."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return f"#{index} ({type(item).__name__})"


def _open_encoded(data: io.BytesIO | Path, name: str) -> Image.Image:
    try:
        return Image.open(data, formats=RASTER_FORMATS)
    except Image.UnidentifiedImageError:
        raise ImageError(name, "cannot decode (not an image in a format this runtime reads: "
                               f"{', '.join(RASTER_FORMATS)})") from None
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow names the stream by repr(): a memory address for bytes, which must not reach a client
        reason = str(e).replace(" " + repr(data), "") if isinstance(data, io.BytesIO) else str(e)
        raise ImageError(name, f"cannot decode ({type(e).__name__}: {reason})") from None


def looks_like_url(text: str) -> bool:
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text) is not None


def _not_a_file(path: Path, given: str) -> str:
    """Why `path` (not a regular file) cannot be read as an image, saying what it is (`given`: as the caller
    wrote it, since Path folds a URL's '//')."""
    if path.is_dir():
        return "directory, not an image file"
    if looks_like_url(given) and not path.exists():
        return "URLs are not fetched; download the image first and give its path"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "file not found"
    kinds = ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "named pipe"),
             (stat.S_ISSOCK, "socket"))
    kind = next((what for test, what in kinds if test(mode)), "special file")
    return f"not a regular file ({kind})"


def open_lazily(item: ImageInput, name: str) -> Image.Image:
    """The image with its size and mode known; for files and bytes only the header has been read."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            if not path.is_file():
                raise ImageError(name, _not_a_file(path, os.fspath(item)))
            if path.stat().st_size == 0:
                raise ImageError(name, "file is empty (0 bytes)")
        except OSError as e:
            raise ImageError(name, f"cannot read ({e.strerror or e})") from None
        return _open_encoded(path, name)
    if isinstance(item, (bytes, bytearray, memoryview)):
        if not len(item):
            raise ImageError(name, "empty bytes")
        return _open_encoded(io.BytesIO(item), name)
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        return _from_array(item, name)
    raise ImageError(name, f"unsupported input type {type(item).__name__} (use a path, bytes, PIL image or uint8 array)")


def check_pixels(img: Image.Image, name: str, max_pixels: int) -> int:
    """The image's pixel count; ImageError if it exceeds `max_pixels`."""
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(name, f"{w}x{h} = {w * h / 1e6:.0f} Mpx is over the {max_pixels / 1e6:.0f} Mpx limit "
                               "(a decompression bomb, or raise max_image_pixels / --max-image-pixels)")
    if w < 1 or h < 1:
        raise ImageError(name, f"image has no pixels ({w}x{h})")
    return w * h


def decode(img: Image.Image, name: str, apply_exif_orientation: bool = False) -> Image.Image:
    """Decode the pixels now, so truncated or corrupt data fails here with the item's name."""
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(name, f"cannot decode ({type(e).__name__}: {e})") from None
    # EXIF orientation is ignored by default, as the reference (PIL.Image.open + CLIPImageProcessor) ignores it.
    return ImageOps.exif_transpose(img) if apply_exif_orientation else img


def open_image(item: ImageInput, name: str, apply_exif_orientation: bool = False,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `item` in one step (header, size check, pixels)."""
    img = open_lazily(item, name)
    check_pixels(img, name, max_pixels)
    return decode(img, name, apply_exif_orientation)


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    # Only unambiguous layouts: uint8 HxW, HxWx3 (RGB) or HxWx4 (RGBA). Float arrays are refused because
    # their range ([0,1] or [0,255]) cannot be known; CHW is refused because HWC is what PIL/numpy give.
    # (Batches of float or CHW tensors go through PickScorer.score_tensors, which is told the layout.)
    if array.dtype != np.uint8:
        raise ImageError(name, f"numpy images must be uint8 HxW, HxWx3 or HxWx4; got dtype {array.dtype}")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        if min(array.shape[:2]) < 1:
            raise ImageError(name, f"image has no pixels (shape {array.shape})")
        return Image.fromarray(np.ascontiguousarray(array))
    raise ImageError(name, f"numpy images must be HxW, HxWx3 or HxWx4; got shape {array.shape}")


class PixelBudget:
    """Decoded pixels held at once by all workers together: a worker whose image does not fit waits for
    the others to finish theirs. Memory in flight is bounded by pixels, not by a count of images."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"pixel budget must be positive, got {limit}")
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.limit)  # one image over the whole budget still runs, alone
        with self._cond:
            self._cond.wait_for(lambda: self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()
