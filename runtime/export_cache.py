"""Artifacts exported on demand for `pickscore score --model M` and `PickScorer.from_pretrained`: one
directory per (model identity, precisions, versions) under the user cache dir, exported and gated on
first use and reused after. Needs the [export] extra.

The model identity is the hub commit the revision resolves to, or the content hashes of a local
folder's config and weights, so a moved branch or changed weights is a new export, never a stale one.
What gets exported is what the chosen backend runs: fp32 + int8 on a CPU, fp32 + the fp16 plan on a
GPU (fp32 stays as the exact fallback), each non-fp32 precision gated at export. Processes asking for
the same artifacts at once take turns: the first exports, the others reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable

from .artifacts import FORMAT_VERSION, MANIFEST, package_versions, sha256_file
from .backends.registry import AUTO_ORDER, BACKENDS
from .durable import write_json_atomically
from .optional import export_tools
from .precisions import DEVICE_PLANS

KEY_PACKAGES = ("pickscore-runtime", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu")
HASH_MEMO = ".file-hashes.json"  # a dotfile: the cache dir lists exports


def cache_root() -> Path:
    if os.environ.get("PICKSCORE_CACHE_DIR"):
        return Path(os.environ["PICKSCORE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pickscore"


def first_use_plan(backend: str, precision: str | None) -> tuple[list[str], str]:
    """(precisions to export, backend that gates them) for scoring on `backend` ("auto": the first that
    can run here). An explicit precision that is exported is added; bf16 runs from the weights (torch) or from
    the fp32 files (openvino: BackendInfo.reads)."""
    name = backend if backend != "auto" else next(n for n in AUTO_ORDER if BACKENDS[n].unavailable() is None)
    device = BACKENDS[name].device
    # the torch backends run from the weights: the artifacts give them the tokenizer and settings only
    precisions = list(DEVICE_PLANS[device]) if BACKENDS[name].builds_from == "artifacts" else ["fp32"]
    files = BACKENDS[name].files_for(precision)  # openvino's bf16 runs the fp32 files
    if files is not None and files not in precisions and BACKENDS[name].builds_from == "artifacts":
        precisions.append(files)
    gate_backend = "onnx-cuda" if device == "cuda" and BACKENDS["onnx-cuda"].unavailable() is None else "onnx-cpu"
    return precisions, gate_backend


def memoised_sha256(path: Path) -> str:
    """sha256 of a (large) file, remembered by path, size and mtime in the cache dir: the weights of a
    local folder are hashed once, not on every run."""
    stat = path.stat()
    memo_file = cache_root() / HASH_MEMO
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    key = str(path.resolve())
    entry = memo.get(key) if isinstance(memo, dict) else None
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = sha256_file(path)
    memo = memo if isinstance(memo, dict) else {}
    memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(memo_file, memo)
    except OSError:
        pass  # a memo that cannot be written only costs a hash next time
    return digest


def cached_artifacts(model: str, precisions: list[str], *, random_init: bool = False, seed: int = 0,
                     stress: bool = False, revision: str | None = None, gate: bool = True,
                     gate_backend: str = "onnx-cpu", progress: Callable[[str], None] = print) -> Path:
    """The cache directory holding `model` exported in `precisions` (exported and gated now if absent)."""
    tools = export_tools("--model (exporting on first use)")
    source = tools.ModelSource(model, random_init=random_init, seed=seed, stress=stress, revision=revision).resolved()
    key = json.dumps([source.cache_key(memoised_sha256), sorted(precisions), gate, package_versions(KEY_PACKAGES),
                      FORMAT_VERSION], sort_keys=True, default=str)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).name or model)
    label = (f"random{seed}" + ("-stress" if stress else "")) if random_init else (source.commit or "weights")[:12]
    target = cache_root() / f"{slug}-{label}-{'+'.join(precisions)}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not (target / MANIFEST).is_file():
        progress(f"first use of {model} ({' + '.join(precisions)}): exporting to {target} (later runs reuse it); "
                 + tools.first_use_estimate(source, precisions, gate))
        tools.export_artifacts(source, target, precisions, force=True, wait=True, reuse_existing=True, progress=progress,
                               gate=gate, gate_backend=gate_backend)
    return target
