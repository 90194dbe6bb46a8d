"""Artifacts exported on demand for `pickscore score --model M`: one directory per (model, precision,
versions) under the user cache dir, exported on first use and reused after. Needs the [export] extra."""

from __future__ import annotations

import hashlib
import json
import os
import re
from importlib import metadata
from pathlib import Path
from typing import Callable

from .artifacts import FORMAT_VERSION, MANIFEST
from .errors import ArtifactError, PickScoreError

KEY_PACKAGES = ("pickscore-runtime", "torch", "transformers", "onnx", "onnxscript")


def cache_root() -> Path:
    if os.environ.get("PICKSCORE_CACHE_DIR"):
        return Path(os.environ["PICKSCORE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pickscore"


def _export_modules():
    try:
        from pickscore_export.build import export_artifacts
        from pickscore_export.source import ModelSource
    except ImportError as e:
        raise PickScoreError(
            f"--model needs the export tools ({e.name} is missing): pip install 'pickscore-runtime[export]' "
            "(on a CPU machine install torch==2.13.0 first), or pass --artifacts DIR from `pickscore export`"
        ) from None
    return ModelSource, export_artifacts


def cached_artifacts(model: str, random_init: bool, seed: int, precision: str,
                     progress: Callable[[str], None] = print) -> Path:
    ModelSource, export_artifacts = _export_modules()
    source = ModelSource(model, random_init=random_init, seed=seed)
    versions = {}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    key = json.dumps([source.cache_key(), precision, versions, FORMAT_VERSION], sort_keys=True, default=str)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).name or model)
    label = f"random{seed}" if random_init else "weights"
    target = cache_root() / f"{slug}-{label}-{precision}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / MANIFEST).is_file():
        return target
    progress(f"first use of {model} ({precision}): exporting to {target} (later runs reuse it)")
    try:
        export_artifacts(source, target, [precision], force=target.exists(), progress=progress)
    except (ArtifactError, OSError):
        if (target / MANIFEST).is_file():  # another process finished the same export first
            return target
        raise
    return target
