"""What the runtime may use of the export package: the one seam (`pickscore_runtime.optional.export_tools`).

Everything here needs torch and transformers; exporting also needs onnx. Nothing else in
pickscore_export is imported by the runtime.
"""

from __future__ import annotations

from typing import Any

from .build import EXPORTED, export_artifacts, first_use_estimate, parse_precisions
from .source import ModelSource, ModelSourceError, load_clip
from .verify import verify_precisions


def source_from_manifest(manifest: dict[str, Any]) -> ModelSource:
    return ModelSource.from_manifest(manifest)


__all__ = ["EXPORTED", "ModelSource", "ModelSourceError", "export_artifacts", "first_use_estimate", "load_clip", "parse_precisions",
           "source_from_manifest", "verify_precisions"]
