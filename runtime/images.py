"""Turning one user-supplied image (path, bytes, PIL image, numpy array) into a decoded PIL image,
with an `ImageError` that names the item for anything that cannot be used."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

ImageInput = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]

from .errors import ImageError  # noqa: E402


def image_name(item: object, index: int) -> str:
    """How results and errors refer to an input: its path, else its position and kind."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return f"#{index} ({type(item).__name__})"


def _decode(data: io.BytesIO | Path, name: str) -> Image.Image:
    try:
        img = Image.open(data)
        img.load()  # decode now: truncated / corrupt data fails here, not later in a worker
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(name, f"cannot decode ({type(e).__name__}: {e})") from None
    return img


def open_image(item: ImageInput, name: str, apply_exif_orientation: bool = False) -> Image.Image:
    """Decode `item`. EXIF orientation is ignored by default, as the reference (PIL.Image.open +
    CLIPImageProcessor) ignores it; pass apply_exif_orientation=True to rotate first."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise ImageError(name, "file not found")
        if path.stat().st_size == 0:
            raise ImageError(name, "file is empty (0 bytes)")
        img = _decode(path, name)
    elif isinstance(item, (bytes, bytearray)):
        if not item:
            raise ImageError(name, "empty bytes")
        img = _decode(io.BytesIO(item), name)
    elif isinstance(item, Image.Image):
        img = item
        try:
            img.load()
        except (OSError, ValueError) as e:
            raise ImageError(name, f"cannot decode ({type(e).__name__}: {e})") from None
    elif isinstance(item, np.ndarray):
        img = _from_array(item, name)
    else:
        raise ImageError(name, f"unsupported input type {type(item).__name__} (use a path, bytes, PIL image or uint8 array)")
    if apply_exif_orientation:
        img = ImageOps.exif_transpose(img)
    return img


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    # Only unambiguous layouts: uint8 HxW, HxWx3 (RGB) or HxWx4 (RGBA). Float arrays are refused because
    # their range ([0,1] or [0,255]) cannot be known; CHW is refused because HWC is what PIL/numpy give.
    if array.dtype != np.uint8:
        raise ImageError(name, f"numpy images must be uint8 HxW, HxWx3 or HxWx4; got dtype {array.dtype}")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        if min(array.shape[:2]) < 1:
            raise ImageError(name, f"image has no pixels (shape {array.shape})")
        return Image.fromarray(np.ascontiguousarray(array))
    raise ImageError(name, f"numpy images must be HxW, HxWx3 or HxWx4; got shape {array.shape}")
