"""Durable writes: a reader (or a crash) sees the old file or the whole new one, never part of it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable


def sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, chunks: Iterable[bytes | memoryview]) -> tuple[str, int]:
    """Write `chunks` to `path` through a temporary file beside it (fsynced, then renamed): readers see
    the old file or the whole new one, never part of it. Returns (sha256, size). On any failure,
    interruptions included, the temporary file is removed and `path` is untouched."""
    digest, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sync_dir(path.parent)
    return digest.hexdigest(), size


def write_json_atomically(path: Path, data: Any) -> None:
    atomic_write(path, [(json.dumps(data, indent=2) + "\n").encode()])
