"""The artifacts directory: `manifest.json` + tower files + `tokenizer.json`.

Written atomically (staged in a sibling temp dir, renamed into place) and validated on load: format
version, every listed file present with its recorded size, and by default its SHA-256 too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import ArtifactError
from .towers import TOWERS, TowerSpec, tower_specs

MANIFEST = "manifest.json"
FORMAT = "pickscore-artifacts"
FORMAT_VERSION = 1
PRECISION_ORDER = ("fp32", "fp16", "int8")  # most accurate first
HASH_CHECKS = ("full", "size")


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path, root: Path) -> dict[str, Any]:
    return {"path": path.relative_to(root).as_posix(), "size": path.stat().st_size, "sha256": sha256_file(path)}


@contextlib.contextmanager
def staged_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp dir beside `target`; on success it replaces `target` by rename.

    A crash or exception leaves `target` untouched (absent, or the previous complete version):
    a half-written export is never loadable because it never carries the target's name.
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        if not target.is_dir() or any(target.iterdir()):
            raise ArtifactError(f"{target} already exists and is not empty (pass --force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; artifacts are meant to be shared
        yield staging
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / "x")
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@dataclass(frozen=True)
class Artifacts:
    """A validated artifacts directory."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, root: str | os.PathLike, hash_check: str = "full") -> "Artifacts":
        """Validate and open `root`. hash_check: "full" (SHA-256 of every file) or "size" (fast)."""
        if hash_check not in HASH_CHECKS:
            raise ValueError(f"hash_check must be one of {HASH_CHECKS}, got {hash_check!r}")
        root = Path(root)
        manifest_path = root / MANIFEST
        if not root.is_dir():
            raise ArtifactError(f"artifacts directory {root} does not exist (create it with `pickscore export`)")
        if not manifest_path.is_file():
            raise ArtifactError(f"{root} has no {MANIFEST}: not an artifacts directory, or an export that did not finish")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{manifest_path} is not valid JSON: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ArtifactError(f"{manifest_path} is not a PickScore artifacts manifest")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{manifest_path} has format_version {version!r}; this runtime reads version {FORMAT_VERSION}. "
                "Re-export with this version of the package, or install the version that wrote it."
            )
        for key in ("model", "dims", "logit_scale", "preprocessing", "tokenizer", "towers"):
            if key not in manifest:
                raise ArtifactError(f"{manifest_path} lacks the {key!r} section")
        artifacts = cls(root, manifest)
        for entry in artifacts._all_file_entries():
            artifacts._check_file(entry, hash_check)
        if not artifacts.precisions:
            raise ArtifactError(f"{root}: no precision has both a text and a vision tower")
        return artifacts

    def _all_file_entries(self) -> Iterator[dict[str, Any]]:
        """Each file once (a file may serve several precisions, e.g. the fp32 text tower for int8)."""
        entries = [self.manifest["tokenizer"]]
        for tower in TOWERS:
            for variant in self.manifest["towers"].get(tower, {}).get("precisions", {}).values():
                entries += variant["files"]
        yield from {e["path"]: e for e in entries}.values()

    def _check_file(self, entry: dict[str, Any], hash_check: str) -> None:
        path = self.root / entry["path"]
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing (re-run `pickscore export`)")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ArtifactError(f"{path} is {size} bytes, the manifest says {entry['size']}: truncated or replaced")
        if hash_check == "full" and sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{path} does not match its SHA-256 in the manifest: the file was modified")

    # ---- what the runtime needs -------------------------------------------------------------
    @property
    def random_weights(self) -> bool:
        return bool(self.manifest["model"].get("random_weights"))

    @property
    def source(self) -> dict[str, Any]:
        return self.manifest["model"]["source"]

    @property
    def logit_scale_exp(self) -> np.float32:
        # exp of the float32 parameter, in float32, exactly as `model.logit_scale.exp()` computes it.
        return np.exp(np.float32(self.manifest["logit_scale"]))

    @property
    def precisions(self) -> list[str]:
        towers = self.manifest["towers"]
        have = [set(towers.get(t, {}).get("precisions", {})) for t in TOWERS]
        both = set.intersection(*have)
        return [p for p in PRECISION_ORDER if p in both]

    def specs(self) -> dict[str, TowerSpec]:
        dims = self.manifest["dims"]
        return tower_specs(dims["embed_dim"], dims["image_size"])

    def tower_file(self, tower: str, precision: str) -> Path:
        try:
            variant = self.manifest["towers"][tower]["precisions"][precision]
        except KeyError:
            raise ArtifactError(
                f"{self.root} has no {precision} {tower} tower (has: {', '.join(self.precisions) or 'none'}); "
                f"export it with `pickscore export --precision {precision}`"
            ) from None
        return self.root / variant["files"][0]["path"]

    @property
    def tokenizer_file(self) -> Path:
        return self.root / self.manifest["tokenizer"]["path"]

    @property
    def fingerprint(self) -> str:
        """Identifies the weights + tokenizer: changes whenever any tower or tokenizer file changes."""
        hashes = sorted(e["sha256"] for e in self._all_file_entries())
        return hashlib.sha256(json.dumps([hashes, self.manifest["logit_scale"]]).encode()).hexdigest()[:16]


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    if not math.isfinite(manifest["logit_scale"]):
        raise ArtifactError("refusing to write a manifest with a non-finite logit scale")
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
