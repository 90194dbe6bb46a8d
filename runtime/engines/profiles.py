"""Engine build flags and the optimisation profiles they imply, derived from the tower specs.

Every dynamic axis of a tower's input (towers.py) gets a [min, opt, max] range: `batch` from 1 to
--max-batch (optimised for --opt-batch), `sequence` over its whole declared range (optimised for its
maximum, 77 tokens: the longest prompt is the slowest, and text is cached). Fixed axes are copied.
Nothing here imports TensorRT.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import PickScoreError
from ..towers import DYNAMIC_AXES, TowerSpec

DEFAULT_MAX_BATCH = 256
DEFAULT_OPT_BATCH = 64
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default: level 4-5 spend much longer searching for little more


@dataclass(frozen=True)
class BuildFlags:
    """What an engine was built with, beyond its ONNX file and the machine: part of its key."""

    max_batch: int = DEFAULT_MAX_BATCH
    opt_batch: int = DEFAULT_OPT_BATCH
    opt_level: int = DEFAULT_OPT_LEVEL  # builder optimisation level, 0-5
    workspace_gb: float | None = None  # builder workspace limit; None: TensorRT's default (the device's memory)
    # Fixed, recorded so a record says how its engine computes: types exactly as the ONNX graph declares
    # them (strongly typed), and no TF32 for the fp32 parts (fp32 means fp32, as in the reference).
    strongly_typed: bool = True
    tf32: bool = False

    def __post_init__(self) -> None:
        lo, hi = DYNAMIC_AXES["batch"]
        if not lo <= self.max_batch <= hi:
            raise PickScoreError(f"--max-batch must be in [{lo}, {hi}], got {self.max_batch}")
        if not lo <= self.opt_batch <= self.max_batch:
            raise PickScoreError(f"--opt-batch must be in [{lo}, --max-batch {self.max_batch}], got {self.opt_batch}")
        if not 0 <= self.opt_level <= 5:
            raise PickScoreError(f"--opt-level must be in [0, 5], got {self.opt_level}")
        if self.workspace_gb is not None and not self.workspace_gb > 0:
            raise PickScoreError(f"--workspace-gb must be positive, got {self.workspace_gb}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BuildFlags":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_json(cls, data: dict[str, list[int]]) -> "ShapeRange":
        return cls(tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))


def axis_range(axis: str, flags: BuildFlags) -> tuple[int, int, int]:
    """(min, opt, max) of one dynamic axis."""
    lo, hi = DYNAMIC_AXES[axis]
    if axis == "batch":
        return lo, flags.opt_batch, flags.max_batch
    return lo, hi, hi


def tower_profile(spec: TowerSpec, flags: BuildFlags) -> dict[str, ShapeRange]:
    """The optimisation profile of one tower: a ShapeRange for each input."""
    profile = {}
    for tensor in spec.inputs:
        ranges = [axis_range(d, flags) if isinstance(d, str) else (d, d, d) for d in tensor.shape]
        profile[tensor.name] = ShapeRange(*(tuple(r[i] for r in ranges) for i in range(3)))
    return profile


def profile_to_json(profile: dict[str, ShapeRange]) -> dict[str, Any]:
    return {name: shapes.to_json() for name, shapes in profile.items()}
