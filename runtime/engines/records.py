"""What identifies an engine and what is recorded about it, and the check that refuses one built for
another GPU, another TensorRT or another ONNX file. Pure data: nothing here imports TensorRT or CUDA.

An engine is keyed by the SHA-256 of the ONNX file it was built from (as the manifest records it), the
TensorRT version, the GPU's name and compute capability, and the build flags. A serialized engine only
runs on the GPU model and TensorRT version that built it, so anything else is refused with a message
that says what differs and how to rebuild.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..errors import BackendUnavailableError
from .profiles import BuildFlags, ShapeRange, profile_to_json


class EngineMismatchError(BackendUnavailableError):
    """No engine here fits this machine, these artifacts or these flags."""


@dataclass(frozen=True)
class EngineEnvironment:
    """The machine side of an engine's key."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"

    def describe(self) -> str:
        return f"{self.gpu_name} (compute capability {self.compute_capability}) with TensorRT {self.tensorrt_version}"


@dataclass(frozen=True)
class EngineKey:
    tower: str
    precision: str
    onnx_sha256: str
    environment: EngineEnvironment
    flags: BuildFlags

    def to_json(self) -> dict[str, Any]:
        env = self.environment
        return {"tower": self.tower, "precision": self.precision, "onnx_sha256": self.onnx_sha256,
                "tensorrt_version": env.tensorrt_version, "gpu_name": env.gpu_name,
                "compute_capability": env.compute_capability, "flags": self.flags.to_json()}

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    @property
    def file_name(self) -> str:
        return f"{self.tower}.{self.precision}.{self.digest[:16]}.engine"


@dataclass(frozen=True)
class EngineRecord:
    """One stored engine: its key, its file (relative to the store) and what was built."""

    key: EngineKey
    file: str
    sha256: str
    size: int
    profiles: dict[str, ShapeRange]
    onnx_file: str = ""
    created_utc: str = ""
    build_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_batch(self) -> int:
        return self.key.flags.max_batch

    def to_json(self) -> dict[str, Any]:
        return {**self.key.to_json(), "key": self.key.digest, "file": self.file, "sha256": self.sha256,
                "size": self.size, "profiles": profile_to_json(self.profiles), "onnx_file": self.onnx_file,
                "created_utc": self.created_utc, "build_seconds": self.build_seconds, **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EngineRecord":
        env = EngineEnvironment(str(data["tensorrt_version"]), str(data["gpu_name"]), str(data["compute_capability"]))
        key = EngineKey(data["tower"], data["precision"], data["onnx_sha256"], env, BuildFlags.from_json(data["flags"]))
        known = {"tower", "precision", "onnx_sha256", "tensorrt_version", "gpu_name", "compute_capability", "flags",
                 "key", "file", "sha256", "size", "profiles", "onnx_file", "created_utc", "build_seconds"}
        return cls(key, str(data["file"]), str(data["sha256"]), int(data["size"]),
                   {name: ShapeRange.from_json(s) for name, s in data["profiles"].items()},
                   data.get("onnx_file", ""), data.get("created_utc", ""), data.get("build_seconds"),
                   {k: v for k, v in data.items() if k not in known})


def differences(record: EngineRecord, want: EngineKey) -> list[str]:
    """What makes `record` unusable for `want` (ignoring build flags), in words; empty if nothing."""
    have, env = record.key, record.key.environment
    out = []
    if env.gpu_name != want.environment.gpu_name:
        out.append(f"it was built on a {env.gpu_name}, this GPU is a {want.environment.gpu_name}")
    if env.compute_capability != want.environment.compute_capability:
        out.append(f"it was built for compute capability {env.compute_capability}, this GPU has "
                   f"{want.environment.compute_capability}")
    if env.tensorrt_version != want.environment.tensorrt_version:
        out.append(f"it was built with TensorRT {env.tensorrt_version}, this is TensorRT {want.environment.tensorrt_version}")
    if have.onnx_sha256 != want.onnx_sha256:
        out.append(f"it was built from an ONNX file with SHA-256 {have.onnx_sha256[:12]}..., the artifacts' "
                   f"{record.onnx_file or 'file'} is now {want.onnx_sha256[:12]}... (re-exported)")
    return out


@dataclass
class EngineLookup:
    """The engine to load for a key, if any, and the engines for its tower and precision that cannot be
    used here, each with the reasons."""

    want: EngineKey
    found: EngineRecord | None
    unusable: list[tuple[EngineRecord, list[str]]]

    def reasons(self) -> str:
        return "; ".join(f"{r.file}: {', '.join(why)}" for r, why in self.unusable)

    def error(self, rebuild: str) -> EngineMismatchError:
        """The refusal: which engines exist and why none can be used, or that none was built; `rebuild`
        is the command that builds one."""
        want = self.want
        what = f"TensorRT engine for the {want.tower} tower ({want.precision})"
        if not self.unusable:
            return EngineMismatchError(f"no {what} has been built for this machine ({want.environment.describe()}) "
                                       f"with these settings; build it with `{rebuild}` (takes minutes)")
        return EngineMismatchError(
            f"refusing to load the {what}: {self.reasons()}. An engine runs only on the GPU model and TensorRT version "
            f"that built it, from the ONNX file it was built from: rebuild it here with `{rebuild}`")


def find_engine(records: Iterable[EngineRecord], want: EngineKey, batch_size: int | None = None,
                exact_flags: bool = False) -> EngineLookup:
    """Look up the engine for `want`: same tower, precision, ONNX hash and machine, and either the same
    flags (exact_flags) or any flags whose profile holds `batch_size` (preferring `want.flags`, then the
    most recently stored)."""
    mine = [r for r in records if (r.key.tower, r.key.precision) == (want.tower, want.precision)]
    unusable, fitting = [], []
    for r in mine:
        why = differences(r, want)
        if not why:
            if exact_flags and r.key.flags != want.flags:
                why = [f"it was built with other flags ({_flag_diff(r.key.flags, want.flags)})"]
            elif batch_size is not None and r.max_batch < batch_size:
                why = [f"its profile holds batches up to {r.max_batch}, not {batch_size}"]
        (unusable.append((r, why)) if why else fitting.append(r))
    newest_last = {id(r): i for i, r in enumerate(mine)}  # records are appended as engines are stored
    found = max(fitting, key=lambda r: (r.key.flags == want.flags, newest_last[id(r)])) if fitting else None
    return EngineLookup(want, found, unusable)


def _flag_diff(have: BuildFlags, want: BuildFlags) -> str:
    a, b = have.to_json(), want.to_json()
    return ", ".join(f"{k} {a[k]} vs {b[k]}" for k in a if a[k] != b[k])
