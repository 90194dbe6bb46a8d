"""Helpers the tests share (fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pytest

from pickscore_models import pickscore_v1_dir


def require_pickscore_files() -> Path:
    """PickScore's config, tokenizer and processor files, as the package ships them (models/pickscore_v1):
    always there, in a clone as in an installed wheel; a missing file is a broken package, not a skip."""
    folder = pickscore_v1_dir()
    missing = [name for name in ("config.json", "tokenizer.json", "preprocessor_config.json") if not (folder / name).is_file()]
    if missing:
        pytest.fail(f"the package's PickScore model files are incomplete: {', '.join(missing)} missing from {folder}")
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


# ---- towers that fail on purpose ------------------------------------------------------------------
def plant_nonfinite(artifacts_dir: str | os.PathLike, dst_dir: str | os.PathLike, *, tower: str = "vision",
                    precision: str = "fp32", when: float | int, value: float = math.nan) -> Path:
    """Copy the artifacts directory `artifacts_dir` to `dst_dir` (which must not exist) with one tower
    graph edited to return `value` (NaN, or an infinity) in every component of the embedding of the
    items `when` picks, and exactly the original embedding for the others. Returns `dst_dir`.

    tower="vision": `when` is a threshold on the mean of an image's preprocessed pixels: images above it
    are poisoned (`pixel_threshold` picks one between the images to poison and those to spare).
    tower="text": `when` is a token id: prompts whose input ids hold it are poisoned (`token_id`).
    precision: the precision whose tower file is edited; precisions sharing that file (int8 shares the
    fp32 text tower) are poisoned too. The copy's manifest records the edited file's size and SHA-256,
    so the copy loads with full hash checks; its gate records (gate.json) are not copied, being about
    the original towers."""
    import onnx
    from onnx import TensorProto, helper

    from pickscore_runtime.artifacts import MANIFEST, file_entry, write_manifest

    src, dst = Path(artifacts_dir), Path(dst_dir)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("gate.json"))
    manifest = json.loads((dst / MANIFEST).read_text())
    section = manifest["towers"][tower]
    rel = section["precisions"][precision]["files"][0]["path"]
    x, y = section["io"]["inputs"][0]["name"], section["io"]["outputs"][0]["name"]
    model = onnx.load(str(dst / rel), load_external_data=False)  # external weights stay in their own files
    graph, clean = model.graph, f"{y}_before_nonfinite"
    for node in graph.node:
        node.output[:] = [clean if o == y else o for o in node.output]
        node.input[:] = [clean if i == y else i for i in node.input]

    def const(name: str, dtype: int, values: Any, dims: Sequence[int] = ()) -> None:
        graph.initializer.append(helper.make_tensor(name, dtype, list(dims), values))

    if tower == "vision":
        const("nonfinite_axes", TensorProto.INT64, [1, 2, 3], [3])
        const("nonfinite_threshold", TensorProto.FLOAT, [float(when)])
        trigger = [helper.make_node("ReduceMean", [x, "nonfinite_axes"], ["nonfinite_mean"], keepdims=0),
                   helper.make_node("Greater", ["nonfinite_mean", "nonfinite_threshold"], ["nonfinite_hit"])]
    elif tower == "text":
        const("nonfinite_token", TensorProto.INT64, [int(when)])
        const("nonfinite_seq_axis", TensorProto.INT64, [1], [1])
        const("nonfinite_half", TensorProto.FLOAT, [0.5])
        trigger = [helper.make_node("Equal", [x, "nonfinite_token"], ["nonfinite_eq"]),
                   helper.make_node("Cast", ["nonfinite_eq"], ["nonfinite_eqf"], to=TensorProto.FLOAT),
                   helper.make_node("ReduceMax", ["nonfinite_eqf", "nonfinite_seq_axis"], ["nonfinite_any"], keepdims=0),
                   helper.make_node("Greater", ["nonfinite_any", "nonfinite_half"], ["nonfinite_hit"])]
    else:
        raise ValueError(f"tower must be vision or text, got {tower!r}")
    const("nonfinite_row_axis", TensorProto.INT64, [1], [1])
    const("nonfinite_value", TensorProto.FLOAT, [value])
    const("nonfinite_zero", TensorProto.FLOAT, [0.0])
    # x + 0 is x exactly, so the items not picked keep their embeddings bit for bit
    graph.node.extend(trigger + [
        helper.make_node("Unsqueeze", ["nonfinite_hit", "nonfinite_row_axis"], ["nonfinite_rows"]),
        helper.make_node("Where", ["nonfinite_rows", "nonfinite_value", "nonfinite_zero"], ["nonfinite_add"]),
        helper.make_node("Add", [clean, "nonfinite_add"], [y])])
    onnx.save(model, str(dst / rel))
    for variant in (v for t in manifest["towers"].values() for v in t["precisions"].values()):
        variant["files"] = [file_entry(dst / f["path"], dst) if f["path"] == rel else f for f in variant["files"]]
    write_manifest(dst, {k: v for k, v in manifest.items() if k not in ("format", "format_version")})
    return dst


def preprocessed_means(artifacts_dir: str | os.PathLike, images: Sequence[Any]) -> np.ndarray:
    """The mean of each image's pixels as the runtime preprocesses them for these artifacts: what a
    vision tower from `plant_nonfinite` compares with its threshold."""
    from pickscore_runtime.artifacts import MANIFEST
    from pickscore_runtime.image_preparer import ImagePreparer
    from pickscore_runtime.preprocess import PreprocessConfig, Preprocessor

    manifest = json.loads((Path(artifacts_dir) / MANIFEST).read_text())
    preparer = ImagePreparer(Preprocessor(PreprocessConfig.from_json(manifest["preprocessing"])))
    means = []
    for j, image in enumerate(images):
        prepared = preparer.prepare(image, j)
        if prepared.error is not None:
            raise prepared.error
        means.append(prepared.pixels.astype(np.float32).mean(dtype=np.float64))
    return np.array(means)


def pixel_threshold(artifacts_dir: str | os.PathLike, poison: Sequence[Any], spare: Sequence[Any]) -> float:
    """A `when` for plant_nonfinite's vision tower that poisons the images `poison` and spares `spare`."""
    hot, cold = preprocessed_means(artifacts_dir, poison).min(), preprocessed_means(artifacts_dir, spare).max()
    assert hot > cold + 1e-3, f"the images to poison (mean {hot:.4f}) must be brighter than the others ({cold:.4f})"
    return float((hot + cold) / 2)


def token_id(artifacts_dir: str | os.PathLike, word: str) -> int:
    """The id of `word` (one token) in these artifacts' tokenizer: a `when` for plant_nonfinite's text tower
    that poisons exactly the prompts holding that word."""
    from pickscore_runtime.artifacts import MANIFEST
    from pickscore_runtime.tokenizer import ClipTokenizer

    root = Path(artifacts_dir)
    tok = json.loads((root / MANIFEST).read_text())["tokenizer"]
    ids = ClipTokenizer(root / tok["path"], tok["max_length"], tok["pad_token"])([word]).input_ids[0]
    assert len(ids) == 3, f"{word!r} is not one token: {ids}"  # <|startoftext|> word <|endoftext|>
    return int(ids[1])


@contextlib.contextmanager
def local_ray_cluster(num_cpus: int, object_store_mb: int, prefix: str) -> Iterator[str]:
    """A local Ray cluster owned by the test process, for the module's tests; yields its GCS address."""
    import ray

    temp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(num_cpus=num_cpus, object_store_memory=object_store_mb * 2**20, include_dashboard=False, _temp_dir=temp,
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
