"""The one gate for optional dependencies, and the one seam into the export package.

The runtime needs only numpy, onnxruntime, tokenizers and pillow. Everything else (torch, transformers,
pyarrow, matplotlib, ray, tensorrt, cuda-python, the server stack) is imported here, when the feature
that needs it is used, and a missing one raises `MissingExtraError` naming the pip extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError

# top-level module -> the pip extra that installs it
EXTRAS = {
    "torch": "torch",
    "transformers": "torch",
    "onnx": "export",
    "pyarrow": "parquet",
    "matplotlib": "bench",
    "ray": "ray",
    "fsspec": "ray",  # hf:// and other fsspec-only URIs in --ray inputs
    "tensorrt": "tensorrt",
    "cuda": "tensorrt",
    "fastapi": "server",
    "uvicorn": "server",
    "prometheus_client": "server",
    "starlette": "server",
    "pickscore_export": "export",
}
TORCH_HINT = "on a CPU machine install torch==2.13.0 first: an unpinned torch pulls gigabytes of CUDA packages"


def require(module: str, feature: str, extra: str | None = None) -> ModuleType:
    """Import `module` (dotted names allowed) for `feature`, or raise MissingExtraError naming the extra
    (`extra`, else the one that brings the missing module)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = (e.name or module).split(".")[0]
        extra = extra or EXTRAS.get(top) or EXTRAS.get(module.split(".")[0], "all")
        raise MissingExtraError(feature, top, extra, TORCH_HINT if top in ("torch", "transformers") else "") from None


def export_tools(feature: str = "exporting or verifying models", needs: tuple[str, ...] = ("torch", "transformers", "onnx"),
                 extra: str = "export") -> ModuleType:
    """`pickscore_export.api`: the only door from the runtime into the export package (export, verify,
    model sources and weights). `needs` are checked first, so a missing one is named with `extra`."""
    for module in needs:
        require(module, feature, extra=extra)
    return require("pickscore_export.api", feature, extra=extra)
