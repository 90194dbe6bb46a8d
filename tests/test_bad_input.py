"""Bad images and tampered or incomplete artifacts: clear errors that name the item."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pickscore_export.samples import synthetic_image
from pickscore_runtime import ArtifactError, ImageError, PickScorer
from pickscore_runtime.artifacts import Artifacts


@pytest.fixture
def jpeg(tmp_path):
    path = tmp_path / "ok.jpg"
    synthetic_image(400, 300, seed=1).save(path, "JPEG")
    return path


def embed_error(scorer, item) -> str:
    with pytest.raises(ImageError) as info:
        scorer.embed_images([item])
    return str(info.value)


def test_corrupt_truncated_and_empty_files(tiny_scorer, tmp_path, jpeg):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    assert "truncated.jpg" in embed_error(tiny_scorer, str(truncated))
    assert "empty (0 bytes)" in embed_error(tiny_scorer, str(empty))
    assert "garbage.png: cannot decode" in embed_error(tiny_scorer, str(garbage))
    assert "file not found" in embed_error(tiny_scorer, str(tmp_path / "nope.jpg"))
    assert "empty bytes" in embed_error(tiny_scorer, b"")


def test_tiny_and_huge_images_are_scored(tiny_scorer, tmp_path):
    one = tmp_path / "1x1.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(one)
    wide = tmp_path / "10000x300.png"
    synthetic_image(10000, 300, seed=2).save(wide)
    result = tiny_scorer.score("a red dot", [str(one), str(wide)])
    assert all(r.error is None and np.isfinite(r.score) for r in result.results)


def test_extreme_aspect_ratio_is_refused_by_name(tiny_scorer, tmp_path):
    path = tmp_path / "sliver.png"
    Image.new("RGB", (300_000, 1)).save(path)
    assert "sliver.png: aspect ratio of 300000x1 is too extreme" in embed_error(tiny_scorer, str(path))


def test_unusable_inputs(tiny_scorer):
    assert "unsupported input type int" in embed_error(tiny_scorer, 42)
    assert "got dtype float32" in embed_error(tiny_scorer, np.zeros((10, 10, 3), np.float32))
    assert "got shape (3, 10, 10)" in embed_error(tiny_scorer, np.zeros((3, 10, 10), np.uint8))


@pytest.fixture
def artifacts_copy(tiny_artifacts, tmp_path):
    return shutil.copytree(tiny_artifacts, tmp_path / "copy")


def test_missing_artifact_file(artifacts_copy):
    (artifacts_copy / "vision.fp16.onnx").unlink()
    with pytest.raises(ArtifactError, match="vision.fp16.onnx is listed in the manifest but missing"):
        Artifacts.load(artifacts_copy)


def test_truncated_artifact_file_caught_even_in_fast_mode(artifacts_copy):
    path = artifacts_copy / "text.fp32.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="truncated or replaced"):
        Artifacts.load(artifacts_copy, hash_check="size")


def test_tampered_artifact_file(artifacts_copy):
    path = artifacts_copy / "vision.fp32.onnx"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    Artifacts.load(artifacts_copy, hash_check="size")  # fast mode only checks sizes, by design
    with pytest.raises(ArtifactError, match="does not match its SHA-256"):
        PickScorer.load(artifacts_copy)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(format_version=99), "format_version 99; this runtime reads version 1"),
    (lambda m: m.update(format="other"), "not a PickScore artifacts manifest"),
    (lambda m: m.pop("towers"), "lacks the 'towers' section"),
])
def test_bad_manifest(artifacts_copy, edit, match):
    path = artifacts_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=match):
        Artifacts.load(artifacts_copy)


def test_unreadable_or_absent_manifest(artifacts_copy, tmp_path):
    (artifacts_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Artifacts.load(artifacts_copy)
    with pytest.raises(ArtifactError, match="does not exist"):
        Artifacts.load(tmp_path / "never-exported")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Artifacts.load(tmp_path / "empty")


def test_interrupted_export_leaves_nothing_loadable(tiny_source, tmp_path, monkeypatch):
    from pickscore_export import build

    real = build.onnx_export.export_fp32

    def export_then_die(module, spec, path, *args):
        if spec.name == "vision":
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-export
        return real(module, spec, path, *args)

    monkeypatch.setattr(build.onnx_export, "export_fp32", export_then_die)
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        build.export_artifacts(tiny_source, target)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".out.lock"]  # the staging directory was removed too
    with pytest.raises(ArtifactError, match="does not exist"):
        Artifacts.load(target)


def test_export_refuses_to_overwrite_without_force(tiny_source, tmp_path):
    from pickscore_export.build import export_artifacts

    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="already exists and is not empty"):
        export_artifacts(tiny_source, target)
    assert (target / "precious.txt").read_text() == "keep me"
