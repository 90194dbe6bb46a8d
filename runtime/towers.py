"""The two towers' inputs, outputs, dtypes and dynamic axes, declared once.

ONNX export (dynamic shapes, IO names), the manifest, input validation in the runtime and TensorRT
optimisation profiles all read these objects, so the names and shapes cannot drift apart.
A dimension is either a fixed int or the name of a dynamic axis in `DYNAMIC_AXES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Dynamic axes and the range each may take. batch's upper bound is a sanity limit for export and
# engine profiles, not a promise that such a batch fits in memory.
DYNAMIC_AXES: dict[str, tuple[int, int]] = {
    "batch": (1, 1024),
    "sequence": (2, 77),  # <|startoftext|> ... <|endoftext|>: never fewer than 2 tokens
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def check(self, array: Any) -> None:
        """Raise ValueError if `array` does not fit this spec (dtype, rank, fixed dims, axis ranges)."""
        if str(array.dtype) != self.dtype:
            raise ValueError(f"{self.name}: expected dtype {self.dtype}, got {array.dtype}")
        if array.ndim != len(self.shape):
            raise ValueError(f"{self.name}: expected rank {len(self.shape)} {self.shape}, got shape {array.shape}")
        for axis, (want, got) in enumerate(zip(self.shape, array.shape)):
            if isinstance(want, int):
                if want != got:
                    raise ValueError(f"{self.name}: axis {axis} must be {want}, got shape {array.shape}")
            else:
                lo, hi = DYNAMIC_AXES[want]
                if not lo <= got <= hi:
                    raise ValueError(f"{self.name}: {want} axis must be in [{lo}, {hi}], got {got}")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class TowerSpec:
    name: str  # "text" | "vision"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def output(self) -> TensorSpec:
        return self.outputs[0]

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}


def tower_specs(embed_dim: int, image_size: int) -> dict[str, TowerSpec]:
    """Both towers of a CLIP with this projection dim and input resolution. Outputs are L2-normalised."""
    return {
        "text": TowerSpec(
            "text",
            inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
            outputs=(TensorSpec("text_embeds", "float32", ("batch", embed_dim)),),
        ),
        "vision": TowerSpec(
            "vision",
            inputs=(TensorSpec("pixel_values", "float32", ("batch", 3, image_size, image_size)),),
            outputs=(TensorSpec("image_embeds", "float32", ("batch", embed_dim)),),
        ),
    }


TOWERS = ("text", "vision")
