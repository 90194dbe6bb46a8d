"""Artifacts that are damaged, hand-edited or tampered with (issue 23): each is refused when it is loaded,
with exit code 2 and a message naming the file or field, never an internal error, a NaN score or a file
that loads unchecked. The tampering here is the consistent kind: files edited and their sizes and SHA-256
re-recorded in the manifest, so the hash check alone cannot catch it."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from helpers import load_quietly, run_cli
from pickscore_runtime.artifacts import Artifacts
from pickscore_runtime.backends import GateWarning, select_backend
from pickscore_runtime.errors import ArtifactError, BackendUnavailableError
from pickscore_runtime.gate_records import GATE_FILE, record_gate_results


def tampered(src: Path, dst: Path, edit_manifest: Callable[[dict], object] | None = None,
             edit_files: Callable[[Path], object] | None = None) -> Path:
    """A copy of the artifacts `src` at `dst`: `edit_files(dst)` first, then every listed file that exists
    re-recorded (size, SHA-256), then `edit_manifest(manifest)`. gate.json is left behind (it is about `src`)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(GATE_FILE))
    manifest = json.loads((dst / "manifest.json").read_text())
    if edit_files:
        edit_files(dst)
    for entry in [manifest["tokenizer"]] + [f for t in manifest["towers"].values() for v in t["precisions"].values()
                                            for f in v["files"]]:
        path = dst / entry["path"]
        if path.is_file():
            entry["size"], entry["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    if edit_manifest:
        edit_manifest(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def variant(m: dict, tower: str = "vision", precision: str = "fp32") -> dict:
    return m["towers"][tower]["precisions"][precision]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def external_weights(path: Path, location: str) -> None:
    """Rewrite the ONNX file `path` with its weights in the file `location` beside it."""
    import onnx

    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=1024)


# (name, edit_manifest, edit_files, what stderr must say)
FAULTS = [
    ("missing file", None, lambda d: (d / "vision.fp32.onnx").unlink(), "vision.fp32.onnx is listed in the manifest but missing"),
    ("bad JSON", None, None, "manifest.json is not valid JSON"),
    ("deeply nested JSON", None, None, "manifest.json is not valid JSON: RecursionError"),  # found by the re-probe
    ("logit_scale overflows exp", lambda m: m.update(logit_scale=100.0), None, "logit_scale is 100.0: exp(logit_scale) = inf"),
    ("image_std 0", lambda m: m["preprocessing"].update(image_std=[0.27, 0.0, 0.28]), None, "preprocessing.image_std is"),
    ("crop 0", lambda m: m["preprocessing"].update(crop_size=0), None, "preprocessing.crop_size is 0"),
    ("resample unknown", lambda m: m["preprocessing"].update(resample="lanczos9"), None, "preprocessing.resample is 'lanczos9'"),
    ("rescale NaN", lambda m: m["preprocessing"].update(rescale_factor=float("nan")), None, "preprocessing.rescale_factor is nan"),
    ("mean of 2", lambda m: m["preprocessing"].update(image_mean=[0.5, 0.5]), None, "preprocessing.image_mean is [0.5, 0.5]"),
    ("size as string", lambda m: m["preprocessing"].update(shortest_edge="224"), None, "preprocessing.shortest_edge is '224'"),
    ("max_length string", lambda m: m["tokenizer"].update(max_length="abc"), None, "tokenizer.max_length is 'abc'"),
    ("trailing slash", lambda m: variant(m)["files"][0].update(path="vision.fp32.onnx/"), None,
     "names 'vision.fp32.onnx/': not a plain relative file path"),
    ("empty path", lambda m: variant(m)["files"][0].update(path=""), None, "names '': an empty path"),
    ("absolute path", lambda m: variant(m)["files"][0].update(path="/etc/hostname"), None, "outside the artifacts directory"),
    ("dot path", lambda m: variant(m)["files"][0].update(path="./vision.fp32.onnx"), None, "not a plain relative file path"),
    ("listed twice", lambda m: variant(m)["files"].append(dict(variant(m)["files"][0])), None,
     "towers.vision.precisions.fp32 lists 'vision.fp32.onnx' twice"),
    ("shared file disagrees", lambda m: variant(m, "text", "int8")["files"][0].update(sha256="0" * 64), None,
     "lists 'text.fp32.onnx' with another size or SHA-256"),
    ("wrong tower IO", None, lambda d: shutil.copy(d / "text.fp32.onnx", d / "vision.fp32.onnx"),
     "vision.fp32.onnx (the fp32 vision tower) has the wrong inputs: ['input_ids'], expected ['pixel_values']"),
    ("embed_dim off", lambda m: m["dims"].update(embed_dim=32), None, "has the wrong outputs"),
    ("truncated ONNX", None, lambda d: truncate(d / "vision.fp32.onnx"), "vision.fp32.onnx is not a readable ONNX model"),
    ("unlisted external data", None, lambda d: external_weights(d / "vision.fp32.onnx", "vision.fp32.onnx.data"),
     "keeps weights in 'vision.fp32.onnx.data', which towers.vision.precisions.fp32.files does not list"),
    ("tokenizer not JSON", None, lambda d: (d / "tokenizer.json").write_text("{nope"), "tokenizer.json cannot be used as the tokenizer"),
]


@pytest.mark.integration
@pytest.mark.parametrize("name,edit_manifest,edit_files,message", FAULTS, ids=[f[0] for f in FAULTS])
def test_every_artifact_fault_exits_2_naming_it(tiny_artifacts, sample_images, tmp_path, name, edit_manifest, edit_files,
                                                message):
    broken = tampered(tiny_artifacts, tmp_path / "art", edit_manifest, edit_files)
    if name == "bad JSON":
        (broken / "manifest.json").write_text((broken / "manifest.json").read_text()[:-40])
    if name == "deeply nested JSON":
        (broken / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    done = run_cli("score", "--artifacts", str(broken), "--backend", "onnx-cpu", "--precision", "fp32",
                   "--prompt", "a cat", str(sample_images[0]), timeout=120)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert message in done.stderr and "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    assert done.stdout == ""  # nothing reported as scored


def test_a_flipped_byte_is_caught_by_the_hash_and_only_then(tiny_artifacts, tmp_path):
    """Untampered manifest, modified file: the SHA-256 check (the default) names it; structure checks still
    run with hash_check="size"."""
    shutil.copytree(tiny_artifacts, tmp_path / "art")
    flip_a_byte(tmp_path / "art" / "vision.fp32.onnx")
    with pytest.raises(ArtifactError, match="vision.fp32.onnx does not match its SHA-256"):
        Artifacts.load(tmp_path / "art")


def test_external_data_listed_beside_its_model_loads_and_scores_the_same(tiny_artifacts, tmp_path, sample_images):
    """The exporter's layout for towers over 2 GB: model + one external-data file, both listed and checked."""
    def add_data_entry(m: dict) -> None:
        data = tmp_path / "art" / "vision.fp32.onnx.data"
        variant(m)["files"].append({"path": data.name, "size": data.stat().st_size,
                                    "sha256": hashlib.sha256(data.read_bytes()).hexdigest()})

    split = tampered(tiny_artifacts, tmp_path / "art", add_data_entry,
                     lambda d: external_weights(d / "vision.fp32.onnx", "vision.fp32.onnx.data"))
    with load_quietly(split, precision="fp32", hash_check="full") as scorer, \
            load_quietly(tiny_artifacts, precision="fp32") as original:
        np.testing.assert_allclose(scorer.embed_images(sample_images[:2]), original.embed_images(sample_images[:2]),
                                   atol=1e-6)
    # the data file swapped for another of the same size: the hash check names it
    flip_a_byte(split / "vision.fp32.onnx.data")
    with pytest.raises(ArtifactError, match="vision.fp32.onnx.data does not match its SHA-256"):
        Artifacts.load(split)


@pytest.mark.parametrize("records,field", [
    ({"onnx-cpu/int8": {"passed": False, "failures": 5, "gate_version": 3}}, "its 'failures' is 5"),
    ({"onnx-cpu/int8": {"passed": True, "failures": [], "gate_version": "3"}}, "its 'gate_version' is '3'"),
    ({"onnx-cpu/int8": ["passed"]}, "it is list, not an object"),
    ({"onnx-cpu/int8": {"passed": "yes", "failures": [], "gate_version": 3}}, "its 'passed' is 'yes'"),
    ({"int8": {"passed": True, "failures": [], "gate_version": 3}}, "its key is not backend/precision"),
    ([1, 2], "is list, not an object"),
    ("{not json", "cannot be read"),
])
def test_a_malformed_gate_record_is_no_verdict_with_a_warning(tiny_artifacts, tmp_path, records, field):
    root = shutil.copytree(tiny_artifacts, tmp_path / "art", ignore=shutil.ignore_patterns(GATE_FILE))
    artifacts = Artifacts.load(root, hash_check="size")
    if isinstance(records, dict):
        for rec in records.values():
            if isinstance(rec, dict):
                rec["fingerprint"] = artifacts.fingerprint
    (root / GATE_FILE).write_text(records if isinstance(records, str) else json.dumps(records))
    with pytest.warns(GateWarning) as caught:
        info, precision, _ = select_backend(artifacts, "auto")
    assert (info.name, precision) == ("onnx-cpu", "fp32")  # no verdict: auto serves the exact precision
    named = [str(w.message) for w in caught if str(root / GATE_FILE) in str(w.message)]
    assert named and any(field in m for m in named), [str(w.message) for w in caught]


@pytest.mark.integration
def test_a_malformed_gate_record_does_not_break_the_cli(tiny_artifacts, tmp_path, sample_images):
    root = shutil.copytree(tiny_artifacts, tmp_path / "art")
    (root / GATE_FILE).write_text(json.dumps({"onnx-cpu/int8": {"passed": False, "failures": 5, "gate_version": 3,
                                                                "fingerprint": "x"}}))
    done = run_cli("score", "--artifacts", str(root), "--prompt", "a cat", str(sample_images[0]), timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"warning: {root / GATE_FILE}: the record 'onnx-cpu/int8' is ignored (no verdict): its 'failures' is 5" \
        in done.stderr


def test_a_precision_refused_by_its_gate_says_so_and_why(tiny_artifacts, tmp_path):
    """Artifacts with only int8 whose gate failed: the error gives the gate's reason, not just what the
    artifacts have."""
    def int8_only(m: dict) -> None:
        for tower in m["towers"].values():
            tower["precisions"] = {"int8": tower["precisions"]["int8"]}

    root = tampered(tiny_artifacts, tmp_path / "art", int8_only)
    artifacts = Artifacts.load(root, hash_check="size")
    record_gate_results(root, artifacts.fingerprint, [{"backend": "onnx-cpu", "precision": "int8", "passed": False,
                                                       "failures": ["pairwise order 0.95 < 0.99"], "gate_version": 3}])
    with warnings.catch_warnings(), pytest.raises(BackendUnavailableError) as refused:
        warnings.simplefilter("ignore", GateWarning)
        select_backend(artifacts, "auto")
    message = str(refused.value)
    assert "int8 failed `pickscore verify` on these artifacts (pairwise order 0.95 < 0.99)" in message, message
    assert "--precision" in message
