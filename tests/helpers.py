"""Helpers the tests share (fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Iterator

import pytest

from pickscore_export.tiny import shared_model_dir


def require_shared_model() -> Path:
    folder = shared_model_dir()
    if not (folder / "config.json").is_file():
        message = f"PickScore config/tokenizer files not found at {folder} (set PICKSCORE_SHARED_MODEL_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI a missing folder is a broken setup, not a reason to skip
        pytest.skip(message)
    return folder


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    """`pickscore ARGS` in a fresh process, offline."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pickscore_runtime.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, **kw)


def load_quietly(artifacts, **kw):
    """PickScorer.load without the random-weights warning (tests that check it load plainly)."""
    from pickscore_runtime import PickScorer, RandomWeightsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return PickScorer.load(artifacts, **{"backend": "onnx-cpu", "hash_check": "size", **kw})


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path | None]:
    """A small real file system at `where` (to fill it, or remount it read-only), or None where this
    machine does not let the tests mount one."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                            capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    try:
        yield where if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)
