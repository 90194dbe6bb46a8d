"""The built-in verification set: prompts that stress tokenisation and generated images that stress
decoding and preprocessing (sizes, aspect ratios, PIL modes, file formats), plus the sizes and formats
generators emit. Deterministic. 16 prompts x 32 images = 7936 image pairs: large enough that gate v3's
gated statistics move by less than their margins when the set is resampled (docs: numerics)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A cozy cabin in the snowy mountains at dusk, warm light in the windows, highly detailed, 8k",
    "OIL PAINTING!!! of a cat... (in the style of Van Gogh) -- swirling   stars?!",
    "Ein Café in Köln mit naïver Fassade, 東京の夜景, 🌸🚀 and a crème brûlée",
    ".",
    "a",
    "3 apples and 12 oranges on a wooden table, 1990s film photo, f/1.8",
    # > 77 tokens: the reference truncates, so must we
    " ".join(["an intricate ornate baroque cathedral interior with golden light streaming through stained glass"] * 6),
    "minimalist logo: red circle on a white background",
    "portrait of an old fisherman, dramatic rim lighting, 85mm, shallow depth of field",
    "isometric pixel art of a tiny floating island with a waterfall",
    "a bowl of ramen, top-down food photography",
    "watercolor sketch of Paris rooftops in the rain",
    "cyberpunk street market at night, neon signs, reflections on wet asphalt, cinematic",
    "a child's crayon drawing of a dragon",
    "macro photo of a dew drop on a spider web, bokeh",
]

# (width, height, PIL mode, file format)
IMAGE_SPECS = [
    (224, 224, "RGB", "PNG"),
    (512, 512, "RGB", "JPEG"),
    (640, 480, "RGB", "JPEG"),
    (480, 640, "RGB", "WEBP"),
    (1024, 256, "RGB", "PNG"),
    (300, 1200, "RGB", "BMP"),
    (37, 53, "RGB", "PNG"),
    (1, 1, "RGB", "PNG"),
    (333, 250, "L", "JPEG"),
    (256, 256, "LA", "PNG"),
    (320, 240, "RGBA", "PNG"),
    (300, 300, "P", "GIF"),
    (280, 210, "P-transparent", "PNG"),
    (400, 300, "CMYK", "JPEG"),
    (240, 320, "I;16", "PNG"),
    (200, 260, "F", "TIFF"),
    (250, 250, "1", "PNG"),
    (2048, 1536, "RGB", "JPEG"),
    # What generators emit, in the formats they are saved in: most of a real evaluation set.
    (512, 512, "RGB", "PNG"),
    (512, 512, "RGB", "WEBP"),
    (768, 768, "RGB", "PNG"),
    (768, 768, "RGB", "JPEG"),
    (1024, 1024, "RGB", "PNG"),
    (1024, 1024, "RGB", "JPEG"),
    (832, 1216, "RGB", "PNG"),
    (1216, 832, "RGB", "JPEG"),
    (896, 1152, "RGB", "WEBP"),
    (640, 640, "RGB", "PNG"),
    (576, 1024, "RGB", "JPEG"),
    (1024, 576, "RGB", "PNG"),
    (448, 448, "RGBA", "PNG"),
    (720, 1280, "RGB", "JPEG"),
]


def synthetic_image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients, shapes and a little noise: distinct, natural-ish content per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([
        127 + 120 * np.sin(x / max(width, 1) * rng.uniform(1, 8) + rng.uniform(0, 6)),
        127 + 120 * np.cos(y / max(height, 1) * rng.uniform(1, 8) + rng.uniform(0, 6)),
        127 + 120 * np.sin((x + y) / max(width + height, 1) * rng.uniform(1, 8)),
    ], axis=-1)
    base += rng.normal(0, 12, base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        x1, y1 = x0 + rng.uniform(0.1, 0.6) * width, y0 + rng.uniform(0.1, 0.6) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return img


def in_mode(img: Image.Image, mode: str, seed: int) -> Image.Image:
    if mode == "RGB":
        return img
    if mode in ("L", "CMYK", "1", "P"):
        return img.convert(mode)
    if mode in ("LA", "RGBA"):
        alpha = Image.fromarray(np.random.default_rng(seed).integers(0, 256, img.size[::-1], dtype=np.uint8))
        out = img.convert(mode)
        out.putalpha(alpha)
        return out
    if mode == "P-transparent":
        out = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        out.info["transparency"] = 0
        return out
    if mode == "I;16":
        return Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)  # PIL picks I;16
    if mode == "F":
        return Image.fromarray(np.asarray(img.convert("L"), dtype=np.float32))  # mode F
    raise ValueError(mode)


def calibration_pixels(config, n: int) -> np.ndarray:
    """n generated images of assorted sizes, from seeds the verify set never uses, preprocessed by the
    runtime (config: a PreprocessConfig): what quantisation calibrates on, so the gate stays held out."""
    from pickscore_runtime.preprocess import Preprocessor

    pre = Preprocessor(config)
    sizes = [(224, 224), (512, 512), (640, 480), (480, 640), (1024, 768), (300, 900), (333, 250), (256, 256)]
    return np.stack([pre(synthetic_image(*sizes[i % len(sizes)], seed=9000 + i)) for i in range(n)])


def write_images(folder: Path, specs=IMAGE_SPECS, seed: int = 0) -> list[Path]:
    """Write the generated set into `folder`; returns the paths in a fixed order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h, mode, fmt) in enumerate(specs):
        img = in_mode(synthetic_image(w, h, seed * 1000 + i), mode, seed * 1000 + i)
        ext = {"JPEG": "jpg", "TIFF": "tif"}.get(fmt, fmt.lower())
        path = folder / f"{i:02d}_{w}x{h}_{mode.replace(';', '')}.{ext}"
        img.save(path, fmt, **({"transparency": 0} if mode == "P-transparent" else {}))
        paths.append(path)
    return paths
