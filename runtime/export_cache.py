"""Artifacts exported on demand for `pickscore score --model M`: one directory per (model, precision,
versions) under the user cache dir, exported on first use and reused after. Needs the [export] extra.
Processes asking for the same artifacts at once take turns: the first exports, the others reuse."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable

from .artifacts import FORMAT_VERSION, MANIFEST, package_versions
from .optional import export_tools

KEY_PACKAGES = ("pickscore-runtime", "torch", "transformers", "onnx", "onnxscript")


def cache_root() -> Path:
    if os.environ.get("PICKSCORE_CACHE_DIR"):
        return Path(os.environ["PICKSCORE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pickscore"


def cached_artifacts(model: str, random_init: bool, seed: int, precision: str, stress: bool = False,
                     progress: Callable[[str], None] = print) -> Path:
    tools = export_tools("--model (exporting on first use)")
    source = tools.ModelSource(model, random_init=random_init, seed=seed, stress=stress)
    key = json.dumps([source.cache_key(), precision, package_versions(KEY_PACKAGES), FORMAT_VERSION], sort_keys=True, default=str)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).name or model)
    label = (f"random{seed}" + ("-stress" if stress else "")) if random_init else "weights"
    target = cache_root() / f"{slug}-{label}-{precision}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not (target / MANIFEST).is_file():
        progress(f"first use of {model} ({precision}): exporting to {target} (later runs reuse it)")
        tools.export_artifacts(source, target, [precision], force=True, wait=True, reuse_existing=True, progress=progress)
    return target
