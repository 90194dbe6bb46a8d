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
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import ArtifactError
from .locks import FileLock
from .onnx_proto import read_onnx_summary
from .precisions import EXPORTED
from .preprocess import PreprocessConfig
from .tokenizer import ClipTokenizer
from .towers import DYNAMIC_AXES, TOWERS, TensorSpec, TowerSpec, tower_specs

MANIFEST = "manifest.json"
FORMAT = "pickscore-artifacts"
FORMAT_VERSION = 1
HASH_CHECKS = ("full", "size")
# CLIP training clamps exp(logit_scale) at 100; a stored scale far beyond that is a corrupted manifest, and
# exp() of one over ~88 overflows float32, which would make every score Inf.
MAX_LOGIT_SCALE_EXP = 1000.0


def logit_scale_problem(value: Any) -> str | None:
    """Why `value` cannot be a model's logit_scale, or None: scores multiply by exp(value) in float32."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"logit_scale is {type(value).__name__}"
    if not math.isfinite(value):
        return f"logit_scale is {value}"
    with np.errstate(over="ignore"):
        scale = float(np.exp(np.float32(value)))
    if not 1.0 / MAX_LOGIT_SCALE_EXP <= scale <= MAX_LOGIT_SCALE_EXP:
        return (f"logit_scale is {value}: exp(logit_scale) = {scale:.4g} is outside [{1 / MAX_LOGIT_SCALE_EXP:g}, "
                f"{MAX_LOGIT_SCALE_EXP:g}] (CLIP caps it at 100)")
    return None


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path, root: Path) -> dict[str, Any]:
    return {"path": path.relative_to(root).as_posix(), "size": path.stat().st_size, "sha256": sha256_file(path)}


def is_artifacts_dir(path: Path) -> bool:
    """Whether `path` holds one of our manifests (what `--force` is allowed to replace)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def export_lock(target: Path) -> FileLock:
    """The lock every writer of `target` takes; it lives beside the target, so it survives replacing it."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(target.parent / f".{target.name}.lock", f"artifacts directory {target}")


@contextlib.contextmanager
def staged_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp dir beside `target`; on success it replaces `target` by rename. The caller
    holds `export_lock(target)`.

    A crash or exception leaves `target` untouched (absent, or the previous complete version): a
    half-written export is never loadable because it never carries the target's name. Staging
    directories left by a killed export of this target are removed (the lock says none is live).
    overwrite=True replaces only an artifacts directory (or an empty one).
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in list(target.parent.glob(f".{target.name}.staging-*")) + list(target.parent.glob(f".{target.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        if not overwrite:
            raise ArtifactError(f"{target} already exists and is not empty (pass --force to replace an artifacts directory)")
        if not is_artifacts_dir(target):
            raise ArtifactError(f"{target} is not a PickScore artifacts directory (no manifest of ours), so --force "
                                "will not replace it; choose another --out, or remove it yourself")
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


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed versions (None when absent), for manifests and cache keys."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass(frozen=True)
class TokenizerConfig:
    """How the manifest says to tokenise (the vocabulary is `Artifacts.tokenizer_file`)."""

    max_length: int  # 77 for CLIP: longer prompts are truncated, as the reference does
    pad_token: str


@dataclass(frozen=True)
class Artifacts:
    """A validated artifacts directory. Read the manifest through the typed properties below (embed_dim,
    image_size, preprocessing, crop_size, tokenizer_config, source, model_name, logit_scale, ...) rather than
    indexing `manifest`: `Artifacts.load` has checked exactly these fields."""

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
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, an over-long integer
            raise ArtifactError(f"{manifest_path} is not valid JSON: {type(e).__name__}: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ArtifactError(f"{manifest_path} is not a PickScore artifacts manifest")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{manifest_path} has format_version {version!r}; this runtime reads version {FORMAT_VERSION}. "
                "Re-export with this version of the package, or install the version that wrote it."
            )
        _check_structure(manifest, manifest_path)
        artifacts = cls(root, manifest)
        for entry in artifacts._all_file_entries():
            artifacts._check_file(entry, hash_check)
        artifacts._check_onnx_files()
        if not artifacts.precisions:
            raise ArtifactError(f"{root}: no precision has both a text and a vision tower")
        return artifacts

    def _all_file_entries(self) -> Iterator[dict[str, Any]]:
        """Each file once (a file may serve several precisions, e.g. the fp32 text tower for int8)."""
        entries = [self.manifest["tokenizer"]]
        for _, _, variant in self._variants():
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

    def _check_onnx_files(self) -> None:
        """Each ONNX tower takes and gives what the runtime will feed and read (towers.py), parses whole (a
        truncated file fails here, not inside a runtime), and keeps its weights only in files the manifest lists
        beside it, so that every byte a runtime loads has been size- and hash-checked."""
        specs, seen = self.specs(), {}
        for tower, precision, variant in self._variants():
            if variant.get("format", "onnx") != "onnx":
                continue
            main = self._main_file(variant)
            path = self.root / main
            if main not in seen:
                try:
                    seen[main] = read_onnx_summary(path)
                except (OSError, ValueError) as e:
                    raise ArtifactError(f"{path} is not a readable ONNX model ({e}): truncated or replaced; "
                                        "re-run `pickscore export`") from None
            summary, spec = seen[main], specs[tower]
            for kind, got, want in (("input", summary.inputs, spec.inputs), ("output", summary.outputs, spec.outputs)):
                problem = io_mismatch(got, want)
                if problem:
                    raise ArtifactError(f"{path} (the {precision} {tower} tower) has the wrong {kind}s: {problem}; "
                                        "it is not this model's tower, or the manifest's dims are wrong")
            listed = {f["path"] for f in variant["files"]}
            for location in summary.external_data:
                data = PurePosixPath(main).parent / location
                if path_problem(location) or data.as_posix() not in listed:
                    raise ArtifactError(f"{path} keeps weights in {location!r}, which towers.{tower}.precisions."
                                        f"{precision}.files does not list, so it would load unchecked; re-run "
                                        "`pickscore export`")

    def _variants(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        for tower in TOWERS:
            for precision, variant in self.manifest["towers"].get(tower, {}).get("precisions", {}).items():
                yield tower, precision, variant

    @staticmethod
    def _main_file(variant: dict[str, Any]) -> str:
        """The path of a variant's model file (`_check_structure` made sure it has exactly one)."""
        fmt = variant.get("format", "onnx")
        return next(f["path"] for f in variant["files"] if f["path"].endswith(f".{fmt}"))

    # ---- what the runtime needs -------------------------------------------------------------
    @property
    def random_weights(self) -> bool:
        return bool(self.manifest["model"].get("random_weights"))

    @property
    def source(self) -> dict[str, Any]:
        """Where the weights came from (hub id + revision, or local path + hashes; random-init flagged with its seed)."""
        return self.manifest["model"]["source"]

    @property
    def model_name(self) -> str:
        """The model's name as the export recorded it ("pickscore_v1"), for the server's model listing."""
        return str(self.manifest["model"].get("name", "pickscore"))

    @property
    def logit_scale(self) -> float:
        """The model's logit_scale parameter, as stored (scores use `logit_scale_exp`)."""
        return float(self.manifest["logit_scale"])

    @property
    def logit_scale_exp(self) -> np.float32:
        # exp of the float32 parameter, in float32, exactly as `model.logit_scale.exp()` computes it.
        return np.exp(np.float32(self.manifest["logit_scale"]))

    @property
    def dims(self) -> dict[str, int]:
        """Every dimension the export recorded (embed_dim, image_size, patch_size, layers...), a copy."""
        return dict(self.manifest["dims"])

    @property
    def embed_dim(self) -> int:
        """Width of both towers' L2-normalised embeddings."""
        return int(self.manifest["dims"]["embed_dim"])

    @property
    def image_size(self) -> int:
        """The vision tower's input side (pixel_values [B, 3, image_size, image_size])."""
        return int(self.manifest["dims"]["image_size"])

    @property
    def preprocessing(self) -> PreprocessConfig:
        """The image preprocessing the towers were exported with (`.to_json()` for its manifest form)."""
        return PreprocessConfig.from_json(self.manifest["preprocessing"])

    @property
    def crop_size(self) -> int:
        """The side of the preprocessed images (the preprocessing's centre crop)."""
        return self.preprocessing.crop_size

    @property
    def tokenizer_config(self) -> TokenizerConfig:
        tok = self.manifest["tokenizer"]
        return TokenizerConfig(int(tok["max_length"]), str(tok["pad_token"]))

    @property
    def created_utc(self) -> str | None:
        return self.manifest.get("created_utc")

    @property
    def packages(self) -> dict[str, str]:
        """Versions of the packages that made the export (python, torch, transformers, onnx...)."""
        return dict(self.manifest.get("packages") or {})

    @property
    def precisions(self) -> list[str]:
        towers = self.manifest["towers"]
        have = [set(towers.get(t, {}).get("precisions", {})) for t in TOWERS]
        both = set.intersection(*have)
        return [p for p in EXPORTED if p in both]

    def specs(self) -> dict[str, TowerSpec]:
        return tower_specs(self.embed_dim, self.image_size)

    def tower_file(self, tower: str, precision: str, fmt: str = "onnx") -> Path:
        """The model file of one tower variant (its weights may sit in a sibling external-data file)."""
        try:
            variant = self.manifest["towers"][tower]["precisions"][precision]
        except KeyError:
            raise ArtifactError(
                f"{self.root} has no {precision} {tower} tower (has: {', '.join(self.precisions) or 'none'}); "
                f"export it with `pickscore export --precision {precision}`"
            ) from None
        if variant.get("format", "onnx") != fmt:
            raise ArtifactError(f"{self.root}: the {precision} {tower} tower is {variant.get('format')!r}, not {fmt!r}")
        return self.root / self._main_file(variant)

    def tower_sha256(self, tower: str, precision: str, fmt: str = "onnx") -> str:
        """The SHA-256 of `tower_file` as the manifest records it (what engines are keyed on)."""
        name = self.tower_file(tower, precision, fmt).relative_to(self.root).as_posix()
        variant = self.manifest["towers"][tower]["precisions"][precision]
        return next(f["sha256"] for f in variant["files"] if f["path"] == name)

    @property
    def tokenizer_file(self) -> Path:
        return self.root / self.manifest["tokenizer"]["path"]

    def open_tokenizer(self) -> ClipTokenizer:
        """The tokenizer as the manifest configures it; ArtifactError naming the file if it cannot be one."""
        config = self.tokenizer_config
        try:
            return ClipTokenizer(self.tokenizer_file, config.max_length, config.pad_token)
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
            raise ArtifactError(f"{self.tokenizer_file} cannot be used as the tokenizer ({e}); re-run `pickscore export`") from None

    @property
    def fingerprint(self) -> str:
        """Identifies the weights + tokenizer: changes whenever any tower or tokenizer file changes."""
        hashes = sorted(e["sha256"] for e in self._all_file_entries())
        return hashlib.sha256(json.dumps([hashes, self.manifest["logit_scale"]]).encode()).hexdigest()[:16]


def path_problem(path: Any) -> str | None:
    """Why `path` cannot name a file inside the artifacts directory, or None: it must be a plain relative
    POSIX path, written the one way (no "./", "//" or trailing "/"), so that two spellings never name one
    file and the manifest's path is the file's."""
    if not isinstance(path, str) or not path:
        return "an empty path"
    parts = PurePosixPath(path).parts
    if path.startswith("/") or ".." in parts:
        return "outside the artifacts directory"
    if PurePosixPath(path).as_posix() != path or "." in path.split("/") or path.endswith("/") or "\\" in path:
        return "not a plain relative file path"
    return None


def io_mismatch(got: Iterable[Any], want: Iterable[TensorSpec]) -> str | None:
    """How a graph's inputs or outputs (onnx_proto.GraphValue) differ from the tower's declared ones, or None.
    A dynamic axis of the spec may be anything in the graph; a fixed one must be that number."""
    got, want = list(got), list(want)
    if [g.name for g in got] != [w.name for w in want]:
        return f"{[g.name for g in got]}, expected {[w.name for w in want]}"
    for g, w in zip(got, want):
        if g.dtype != w.dtype:
            return f"{g.name} is {g.dtype}, expected {w.dtype}"
        if g.shape is not None and (len(g.shape) != len(w.shape) or any(
                isinstance(d, int) and d != e for d, e in zip(g.shape, w.shape))):
            return f"{g.name} has shape {list(g.shape)}, expected {list(w.shape)}"
    return None


def _check_structure(manifest: dict[str, Any], where: Path) -> None:
    """Every field the runtime reads has the type it expects; an ArtifactError names the first that does not."""
    def fail(what: str) -> None:
        raise ArtifactError(f"{where} is malformed: {what} (re-run `pickscore export`)")

    for key, kind in (("model", dict), ("dims", dict), ("logit_scale", (int, float)), ("preprocessing", dict),
                      ("tokenizer", dict), ("towers", dict)):
        if key not in manifest:
            raise ArtifactError(f"{where} lacks the {key!r} section")
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            fail(f"{key!r} is {type(manifest[key]).__name__}")
    problem = logit_scale_problem(manifest["logit_scale"])
    if problem:
        fail(problem)
    for key in ("embed_dim", "image_size"):
        value = manifest["dims"].get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(f"dims.{key} is {value!r}")
    if not isinstance(manifest["model"].get("source"), dict):
        fail("model.source is missing")
    try:
        PreprocessConfig.from_json(manifest["preprocessing"])
    except ValueError as e:
        fail(f"preprocessing.{e}")
    tokenizer = manifest["tokenizer"]
    lo, hi = DYNAMIC_AXES["sequence"]
    if not isinstance(tokenizer.get("max_length"), int) or isinstance(tokenizer["max_length"], bool) \
            or not lo <= tokenizer["max_length"] <= hi:
        fail(f"tokenizer.max_length is {tokenizer.get('max_length')!r}, expected a whole number in [{lo}, {hi}]")
    if not isinstance(tokenizer.get("pad_token"), str) or not tokenizer["pad_token"]:
        fail(f"tokenizer.pad_token is {tokenizer.get('pad_token')!r}, expected a token")
    lists: list[tuple[str, list[Any], str | None]] = [("tokenizer", [tokenizer], None)]
    for tower, section in manifest["towers"].items():
        variants = section.get("precisions") if isinstance(section, dict) else None
        if not isinstance(variants, dict):
            fail(f"towers.{tower}.precisions is missing")
        for precision, variant in variants.items():
            label = f"towers.{tower}.precisions.{precision}"
            files = variant.get("files") if isinstance(variant, dict) else None
            if not isinstance(files, list) or not files:
                fail(f"{label}.files is missing")
            fmt = variant.get("format", "onnx")
            if not isinstance(fmt, str):
                fail(f"{label}.format is {fmt!r}")
            lists.append((label, files, fmt))
    recorded: dict[str, tuple[Any, Any]] = {}
    for label, entries, fmt in lists:
        seen = set()
        for entry in entries:
            if not (isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("size"), int)
                    and not isinstance(entry["size"], bool) and isinstance(entry.get("sha256"), str)):
                fail(f"{label} has a file entry without path, size and sha256")
            problem = path_problem(entry["path"])
            if problem:
                fail(f"{label} names {entry['path']!r}: {problem}")
            if entry["path"] in seen:
                fail(f"{label} lists {entry['path']!r} twice")
            seen.add(entry["path"])
            # a file shared by precisions (int8 runs the fp32 text tower) is checked once: its entries must agree
            if recorded.setdefault(entry["path"], (entry["size"], entry["sha256"])) != (entry["size"], entry["sha256"]):
                fail(f"{label} lists {entry['path']!r} with another size or SHA-256 than an earlier entry")
        if fmt is not None and len([e for e in entries if e["path"].endswith(f".{fmt}")]) != 1:
            fail(f"{label} lists no .{fmt} file, or several: it needs exactly one (the model)")


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    problem = logit_scale_problem(manifest["logit_scale"])
    if problem:
        raise ArtifactError(f"refusing to write a manifest whose {problem}")
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
