"""Fixtures for the pytest-benchmark suite: artifacts given by PICKSCORE_BENCH_ARTIFACTS (e.g. the full
architecture), else a tiny random CLIP exported on the fly (a smoke run of every stage)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bench_artifacts(tmp_path_factory) -> Path:
    if os.environ.get("PICKSCORE_BENCH_ARTIFACTS"):
        return Path(os.environ["PICKSCORE_BENCH_ARTIFACTS"])
    from pickscore_export.build import export_artifacts
    from pickscore_export.source import ModelSource
    from pickscore_export.tiny import make_tiny_model_dir

    folder = make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    return export_artifacts(ModelSource(str(folder), random_init=True), tmp_path_factory.mktemp("a") / "art", ["fp32", "int8"])


@pytest.fixture(scope="session", params=["fp32", "int8"])
def scorer(request, bench_artifacts):
    from pickscore_runtime import PickScorer, RandomWeightsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return PickScorer.load(bench_artifacts, backend="onnx-cpu", precision=request.param, hash_check="size")
