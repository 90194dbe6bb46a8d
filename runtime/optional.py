"""The one gate for optional dependencies, and the one seam into the export package.

The runtime needs only numpy, tokenizers and pillow, plus one ONNX Runtime: the paired extras [cpu]
(onnxruntime) or [gpu] (onnxruntime-gpu), which provide the same `onnxruntime` module and must never be
installed together. Everything else (torch, transformers, pyarrow, matplotlib, ray, tensorrt, cuda-python,
openvino, the server stack) is imported here, when the feature that needs it is used, and a missing one raises
`MissingExtraError` naming the pip extra.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import MissingExtraError

# top-level module -> the pip extra that installs it
EXTRAS = {
    "onnxruntime": "cpu",  # or [gpu]: ORT_HINT says so
    "torch": "torch",
    "transformers": "torch",
    "onnx": "export",
    "pyarrow": "parquet",
    "matplotlib": "bench",
    "ray": "ray",
    "fsspec": "ray",  # hf:// and other fsspec-only URIs in --ray inputs
    "tensorrt": "tensorrt",
    "openvino": "openvino",
    "cuda": "tensorrt",
    "fastapi": "server",
    "uvicorn": "server",
    "prometheus_client": "server",
    "starlette": "server",
    "pickscore_export": "export",
}
TORCH_HINT = "on a CPU machine install torch==2.13.0 first: an unpinned torch pulls gigabytes of CUDA packages"
ORT_HINT = ("or 'pickscore-runtime[gpu]' for onnxruntime-gpu on NVIDIA machines: one of the two, never both, "
            "as both provide the `onnxruntime` module")
HINTS = {"torch": TORCH_HINT, "transformers": TORCH_HINT, "onnxruntime": ORT_HINT}


def findable(module: str) -> bool:
    """Whether `module` (dotted names allowed) could be imported, without importing it; never raises."""
    try:
        return importlib.util.find_spec(module) is not None
    except Exception:  # noqa: BLE001 - find_spec of a dotted name imports its parent, which may raise anything
        return False


def require(module: str, feature: str, extra: str | None = None) -> ModuleType:
    """Import `module` (dotted names allowed) for `feature`, or raise MissingExtraError naming the extra
    (`extra`, else the one that brings the missing module)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = (e.name or module).split(".")[0]
        extra = extra or EXTRAS.get(top) or EXTRAS.get(module.split(".")[0], "all")
        raise MissingExtraError(feature, top, extra, HINTS.get(top, "")) from None


def require_onnxruntime(feature: str = "the ONNX Runtime backends") -> ModuleType:
    """The `onnxruntime` module, or MissingExtraError naming [cpu] and [gpu]."""
    return require("onnxruntime", feature)


def export_tools(feature: str = "exporting or verifying models",
                 needs: tuple[str, ...] = ("torch", "transformers", "onnx", "onnxruntime"),
                 extra: str = "export") -> ModuleType:
    """`pickscore_export.api`: the only door from the runtime into the export package (export, verify,
    model sources and weights). `needs` are checked first, so a missing one is named with `extra`
    (onnxruntime, which [export] leaves to [cpu] or [gpu], with those)."""
    for module in needs:
        require(module, feature, extra=None if module == "onnxruntime" else extra)
    return require("pickscore_export.api", feature, extra=extra)
