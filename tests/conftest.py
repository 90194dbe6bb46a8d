"""Shared fixtures: the real PickScore tokenizer/processor files from ../shared, a tiny random CLIP
built from models/tiny_clip with those files, its exported artifacts (fp32, fp16, int8), generated
images on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import require_shared_model


@pytest.fixture(scope="session")
def shared_model() -> Path:
    return require_shared_model()


@pytest.fixture(scope="session")
def tolerances() -> dict:
    from pickscore_models import model_info

    return model_info()["tolerances"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, shared_model) -> Path:
    from pickscore_export.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_clip"), shared_model)


@pytest.fixture(scope="session")
def tiny_source(tiny_model_dir):
    from pickscore_export.source import ModelSource

    return ModelSource(str(tiny_model_dir), random_init=True, seed=0)


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, tiny_source) -> Path:
    from pickscore_export.build import export_artifacts

    out = tmp_path_factory.mktemp("tiny_artifacts") / "art"
    return export_artifacts(tiny_source, out, ["fp32", "fp16", "int8"])


@pytest.fixture(scope="session")
def tiny_scorer(tiny_artifacts):
    from pickscore_runtime import PickScorer

    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        scorer = PickScorer.load(tiny_artifacts, backend="onnx-cpu", precision="fp32")
    yield scorer
    scorer.close()


@pytest.fixture(scope="session")
def tiny_reference(tiny_source):
    from pickscore_export.reference import Reference

    return Reference(tiny_source)


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> list[Path]:
    from pickscore_export.samples import write_images

    return write_images(tmp_path_factory.mktemp("samples"))
