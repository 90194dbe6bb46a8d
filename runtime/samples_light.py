"""Small deterministic inputs for benchmarks, without the export package (no torch)."""

from __future__ import annotations

import numpy as np
from PIL import Image

BENCH_PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "a cozy cabin in the snowy mountains at dusk, warm light in the windows, highly detailed",
    "oil painting of a cat in the style of van gogh",
    "minimalist logo, red circle on a white background",
]


def bench_prompts(n: int) -> list[str]:
    return [f"{BENCH_PROMPTS[i % len(BENCH_PROMPTS)]} #{i}" for i in range(n)]


def bench_images(n: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]
