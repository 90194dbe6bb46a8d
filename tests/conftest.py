"""Shared fixtures: the real PickScore config/tokenizer/processor files (shipped in the package:
models/pickscore_v1), a tiny random CLIP built from models/tiny_clip with those files, its exported
artifacts (fp32, fp16, int8), generated images on disk.

And CI's rule that nothing skips unnoticed: with PICKSCORE_NO_SKIPS=1 (.ci/run sets it), a test that
skips without the `gpu` marker (or a module that skips at collection) makes the run fail, listed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import require_pickscore_files

NO_SKIPS_ENV = "PICKSCORE_NO_SKIPS"
_unexpected_skips: list[tuple[str, str]] = []  # (node id, reason)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("gpu") is None:
        _unexpected_skips.append((item.nodeid, _skip_reason(report)))


def pytest_collectreport(report):
    if report.skipped:  # a whole module skipped (pytest.importorskip / allow_module_level)
        _unexpected_skips.append((report.nodeid, _skip_reason(report)))


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get(NO_SKIPS_ENV) == "1" and _unexpected_skips and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if os.environ.get(NO_SKIPS_ENV) != "1" or not _unexpected_skips:
        return
    terminalreporter.write_sep("=", f"{NO_SKIPS_ENV}=1: {len(_unexpected_skips)} skip(s) of tests without the gpu "
                                    "marker; the run FAILS (only gpu-marked tests may skip)", red=True, bold=True)
    for nodeid, reason in _unexpected_skips:
        terminalreporter.write_line(f"SKIPPED {nodeid}: {reason}")


@pytest.fixture(scope="session")
def pickscore_files() -> Path:
    """PickScore v1's config, tokenizer and processor files (no weights), from the package."""
    return require_pickscore_files()


@pytest.fixture(scope="session")
def tolerances() -> dict:
    from pickscore_models import model_info

    return model_info()["tolerances"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, pickscore_files) -> Path:
    from pickscore_export.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_clip"), pickscore_files)


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
