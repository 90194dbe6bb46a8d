"""Runtime preprocessing against transformers' CLIPImageProcessorPil (the processor the model card ran)
for many sizes, aspect ratios, every PIL mode users send, and numpy input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pickscore_export.samples import in_mode, synthetic_image
from pickscore_runtime.images import open_image
from pickscore_runtime.preprocess import PreprocessConfig, Preprocessor

SIZES = [(224, 224), (225, 224), (224, 225), (1, 1), (2, 3), (37, 53), (223, 500), (640, 480), (480, 640),
         (1000, 333), (10000, 300), (300, 10000), (1023, 767), (4096, 2160)]
MODES = ["RGB", "L", "LA", "RGBA", "P", "P-transparent", "CMYK", "I;16", "F", "1", "I"]


@pytest.fixture(scope="module")
def processors(pickscore_files):
    from transformers import CLIPImageProcessorPil

    from pickscore_export.source import read_preprocessing

    ours = Preprocessor(PreprocessConfig.from_json(read_preprocessing(pickscore_files)))
    return CLIPImageProcessorPil.from_pretrained(pickscore_files), ours


def reference_pixels(ref, img) -> np.ndarray:
    return ref(images=[img], return_tensors="np")["pixel_values"][0]


def make(mode: str, size, seed: int) -> Image.Image:
    img = synthetic_image(*size, seed=seed)
    if mode == "I":
        return Image.fromarray(np.asarray(img.convert("L"), dtype=np.int32) * 100)
    return in_mode(img, mode, seed)


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_sizes_rgb(processors, size):
    ref, ours = processors
    img = make("RGB", size, seed=size[0] * 7 + size[1])
    got, want = ours(img), reference_pixels(ref, img)
    assert got.shape == want.shape == (3, 224, 224) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(333, 250), (64, 97)], ids=["333x250", "64x97"])
def test_modes(processors, mode, size):
    ref, ours = processors
    img = make(mode, size, seed=len(mode))
    assert img.mode == {"P-transparent": "P"}.get(mode, mode)
    assert np.abs(ours(img) - reference_pixels(ref, img)).max() <= 1e-5


@pytest.mark.parametrize("fmt,mode", [("PNG", "P-transparent"), ("PNG", "LA"), ("GIF", "P"), ("JPEG", "CMYK"),
                                      ("TIFF", "F"), ("PNG", "I;16"), ("WEBP", "RGBA")])
def test_decoded_files(processors, fmt, mode):
    """Through a real encode/decode, as images arrive from disk."""
    ref, ours = processors
    buf = io.BytesIO()
    img = make(mode, (300, 200), seed=3)
    img.save(buf, fmt, **({"transparency": 0} if mode == "P-transparent" else {}))
    data = buf.getvalue()
    got = ours(open_image(data, "x"))
    want = reference_pixels(ref, Image.open(io.BytesIO(data)))
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("channels", [None, 3, 4])
def test_numpy_uint8_arrays(processors, channels):
    ref, ours = processors
    rng = np.random.default_rng(channels or 1)
    shape = (180, 260) if channels is None else (180, 260, channels)
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    got = ours(open_image(array, "array"))
    # the reference's numpy path (channels-last uint8) must agree with its PIL path and with ours
    want = reference_pixels(ref, array if channels is not None else Image.fromarray(array))
    assert np.abs(got - want).max() <= 1e-5


def test_exif_orientation_follows_reference_by_default(processors):
    ref, ours = processors
    img = synthetic_image(320, 200, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    data = buf.getvalue()
    want = reference_pixels(ref, Image.open(io.BytesIO(data)))
    assert np.abs(ours(open_image(data, "x")) - want).max() <= 1e-5
    rotated = ours(open_image(data, "x", apply_exif_orientation=True))
    assert np.abs(rotated - want).max() > 0.1  # the opt-in really rotates
