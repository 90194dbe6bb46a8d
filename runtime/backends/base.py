"""The one interface every inference engine implements."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    name: str  # "onnx-cpu", "onnx-cuda", "tensorrt", "torch" (export's reference)
    precision: str  # "fp32" | "fp16" | "int8"
    max_batch: int  # largest batch one call should get; callers split larger work

    def embed_text(self, input_ids: np.ndarray) -> np.ndarray:
        """int64 [B, T] -> L2-normalised float32 [B, D]."""

    def embed_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """float32 [B, 3, S, S] -> L2-normalised float32 [B, D]."""
