"""Every precision the project knows, declared once: which are exported as ONNX towers (most accurate
first), which is exact, and what each device's fast path exports beside fp32. The CLI's choices, the
registry, the artifacts and the exporter all read this table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    name: str
    exported: bool  # ONNX towers are exported for it (`pickscore export --precision`)
    about: str


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", True, "exact: the reference graph, served without a gate record"),
    Precision("fp16", True, "half precision: the GPU plan (LayerNorm, softmax and the projection stay fp32)"),
    Precision("int8", True, "the CPU plan: a SmoothQuant'ed int8 vision tower, gated against the reference"),
    Precision("bf16", False, "torch autocast, run from the weights by the torch backends (never exported)"),
)}
NAMES: tuple[str, ...] = tuple(PRECISIONS)
EXPORTED: tuple[str, ...] = tuple(name for name, p in PRECISIONS.items() if p.exported)  # most accurate first
EXACT = "fp32"
DEVICE_PLANS: dict[str, tuple[str, ...]] = {"cpu": ("fp32", "int8"), "cuda": ("fp32", "fp16")}  # fp32 beside the fast one
