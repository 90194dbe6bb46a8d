"""Where engines live and the records that list them.

Engines go beside the ONNX files they come from: `DIR/engines/<tower>.<precision>.<key>.engine`, listed
in the artifacts' manifest (`engines`). When the artifacts directory cannot be written (a read-only
mount, a shared model store), they go to the user cache instead,
`<cache>/engines/<artifacts fingerprint>/`, listed in its `index.json`. Both are read on load.

Writes are atomic: an engine file is written to a temporary file, fsynced and renamed into place, and
only then is its record added, under the artifacts' lock, by the same temp-file-and-rename. A write
that fails or is interrupted leaves neither a record nor a partial file. Nothing here imports TensorRT.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from ..artifacts import MANIFEST, Artifacts, export_lock, sha256_file
from ..durable import atomic_write, write_json_atomically
from ..errors import ArtifactError, PickScoreError
from ..export_cache import cache_root
from ..locks import FileLock
from .records import EngineKey, EngineLookup, EngineMismatchError, EngineRecord, find_engine

log = logging.getLogger("pickscore")

ENGINES_DIR = "engines"
INDEX = "index.json"
INDEX_FORMAT = "pickscore-engines"


class EngineWriteError(PickScoreError):
    """An engine or its record could not be written (disk full, no permission); nothing was recorded."""


def chunked(data: bytes | memoryview, size: int = 64 << 20) -> Iterator[memoryview]:
    view = memoryview(data).cast("B")
    for start in range(0, len(view), size):
        yield view[start : start + size]


@dataclass(frozen=True)
class Location:
    """One place engines are kept: the artifacts directory (records in its manifest) or the cache."""

    root: Path  # engine file paths in records are relative to this
    records_file: Path  # manifest.json or index.json
    kind: str  # "artifacts" | "cache"

    @property
    def engine_dir(self) -> Path:
        return self.root / ENGINES_DIR if self.kind == "artifacts" else self.root

    def writable(self) -> bool:
        # the lock file lives beside the directory it protects, so its parent must be writable too
        return (os.access(self.root, os.W_OK) and os.access(self.root.parent, os.W_OK)
                and (not self.records_file.exists() or os.access(self.records_file, os.W_OK))
                and (not self.engine_dir.exists() or os.access(self.engine_dir, os.W_OK)))

    def read(self) -> list[EngineRecord]:
        try:
            doc = json.loads(self.records_file.read_text())
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{self.records_file} cannot be read: {e}") from None
        entries = doc.get("engines", []) if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise ArtifactError(f"{self.records_file}: `engines` is not a list (rebuild with `pickscore engine build`)")
        try:
            return [EngineRecord.from_json(e) for e in entries]
        except (KeyError, TypeError, ValueError, PickScoreError) as e:
            raise ArtifactError(f"{self.records_file} has a malformed engine record ({type(e).__name__}: {e}); "
                                "rebuild with `pickscore engine build`") from None

    def lock(self) -> FileLock:
        return export_lock(self.root)


class EngineStore:
    """The engines of one artifacts directory, wherever they are kept."""

    def __init__(self, artifacts: Artifacts, cache_dir: Path | None = None):
        self.artifacts = artifacts
        root = Path(artifacts.root).absolute()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / ENGINES_DIR / artifacts.fingerprint
        self.locations = [Location(root, root / MANIFEST, "artifacts"),
                          Location(self.cache_dir.absolute(), self.cache_dir.absolute() / INDEX, "cache")]

    @property
    def target(self) -> Location:
        """Where new engines go: the artifacts directory when it can be written, else the cache."""
        return self.locations[0] if self.locations[0].writable() else self.locations[1]

    def records(self) -> list[tuple[EngineRecord, Path]]:
        """Every recorded engine with the path of its file."""
        return [(r, loc.root / r.file) for loc in self.locations for r in loc.read()]

    def lookup(self, want: EngineKey, batch_size: int | None = None, exact_flags: bool = False) -> EngineLookup:
        return find_engine([r for r, _ in self.records()], want, batch_size, exact_flags)

    def path(self, record: EngineRecord) -> Path:
        return next(p for r, p in self.records() if r == record)

    def checked_path(self, record: EngineRecord, rebuild: str) -> Path:
        """The engine's file, after checking its size and SHA-256 against its record (an engine is
        executable code: a file that differs from what was built is never deserialized)."""
        path = self.path(record)
        if not path.is_file():
            raise EngineMismatchError(f"engine {path} is recorded but missing; rebuild it with `{rebuild}`")
        if path.stat().st_size != record.size or sha256_file(path) != record.sha256:
            raise EngineMismatchError(f"engine {path} does not match its record (modified or truncated); "
                                      f"rebuild it with `{rebuild}`")
        return path

    @contextlib.contextmanager
    def build_lock(self, key: EngineKey) -> Iterator[None]:
        """Held while building and storing one engine, so that processes wanting the same engine build it
        once: the others wait, then find it."""
        directory = self.target.engine_dir
        directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(directory / f".{key.file_name}.lock", f"the build of {key.file_name}")
        try:
            lock.acquire(wait=False)
        except PickScoreError:
            log.warning("another process is building %s; waiting for it", key.file_name)
            lock.acquire(wait=True)
        try:
            yield
        finally:
            lock.release()

    def add(self, key: EngineKey, chunks: Iterable[bytes | memoryview], profiles: dict, onnx_file: str,
            build_seconds: float | None = None) -> tuple[EngineRecord, Path]:
        """Store an engine: its file atomically, then its record (replacing one with the same key)."""
        loc = self.target
        loc.engine_dir.mkdir(parents=True, exist_ok=True)
        path = loc.engine_dir / key.file_name
        for stale in loc.engine_dir.glob(f".{key.file_name}.tmp-*"):  # left by a killed writer of this key
            stale.unlink(missing_ok=True)
        try:
            sha256, size = atomic_write(path, chunks)
        except OSError as e:
            raise EngineWriteError(f"cannot write engine {path}: {e.strerror or e}; nothing was recorded") from None
        record = EngineRecord(key, path.relative_to(loc.root).as_posix(), sha256, size, profiles, onnx_file,
                              datetime.now(timezone.utc).isoformat(timespec="seconds"), build_seconds)
        try:
            self._record(loc, record)
        except BaseException:
            path.unlink(missing_ok=True)  # a file without a record would never be loaded: do not keep it
            raise
        return record, path

    def _record(self, loc: Location, record: EngineRecord) -> None:
        with loc.lock().acquire(wait=True, timeout_s=600):
            if loc.kind == "artifacts":
                doc = json.loads(loc.records_file.read_text())
            else:
                doc = (json.loads(loc.records_file.read_text()) if loc.records_file.exists() else
                       {"format": INDEX_FORMAT, "artifacts": str(self.artifacts.root),
                        "fingerprint": self.artifacts.fingerprint, "engines": []})
            kept = [e for e in doc.get("engines", []) if e.get("key") != record.key.digest]
            doc["engines"] = kept + [record.to_json()]
            try:
                write_json_atomically(loc.records_file, doc)
            except OSError as e:
                raise EngineWriteError(f"cannot record the engine in {loc.records_file}: {e.strerror or e}") from None
