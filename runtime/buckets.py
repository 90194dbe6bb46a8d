"""Fixed batch sizes ("buckets") for runs whose shapes must not change between calls (CUDA graphs,
fixed-shape sessions): which bucket holds a batch, and how a batch larger than every bucket is split.
Shared by the torch-cuda graphs (torch_towers) and onnx-cuda's bucketed sessions (onnxruntime_io)."""

from __future__ import annotations

from typing import Sequence


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes fixed-shape runs use: powers of two below `max_batch`, and `max_batch`."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    return tuple(sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch} | {max_batch}))


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `n` rows (the largest for more: `row_chunks` splits those first)."""
    return next((b for b in buckets if b >= n), buckets[-1])


def row_chunks(n: int, largest: int) -> list[slice]:
    """Row slices of at most `largest` rows covering `n` rows."""
    return [slice(i, min(i + largest, n)) for i in range(0, n, largest)]
