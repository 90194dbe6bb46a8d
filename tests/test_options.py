"""One typed set of scorer options: declared once, checked before anything opens, and the same at every
entry point (PickScorer, the CLI's score and serve, the server's config, the Ray job)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from helpers import load_quietly
from pickscore_runtime import DecodeOptions, PickScoreError, ScorerOptions
from pickscore_runtime.backends import BACKENDS
from pickscore_runtime.cli import build_parser


def test_an_unknown_backend_option_is_refused_with_a_suggestion():
    with pytest.raises(PickScoreError, match=r"takes no option 'cuda_graph' \(did you mean 'cuda_graphs'\?\)"):
        ScorerOptions.of(cuda_graph=True)  # auto: no candidate declares it
    with pytest.raises(PickScoreError, match="backend onnx-cpu takes no option 'cuda_graphs'; it takes: none"):
        ScorerOptions.of(backend="onnx-cpu", cuda_graphs=True)  # declared by onnx-cuda, not by onnx-cpu
    with pytest.raises(PickScoreError, match="takes bool"):
        ScorerOptions.of(backend="tensorrt", build="no")


def test_every_backend_option_is_declared_by_the_create_that_takes_it():
    import importlib
    import inspect

    for info in BACKENDS.values():
        try:
            module = importlib.import_module(info.module)
        except ImportError:  # a GPU-only module's imports; its declarations are still data
            continue
        params = inspect.signature(module.create).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), f"{info.name}: create() swallows **kwargs"
        assert {o.name for o in info.options} <= set(params), info.name


@pytest.mark.parametrize("settings, says", [
    ({"backend": "onnx-cpuu"}, "did you mean 'onnx-cpu'"),
    ({"backend": "onnx-cpu", "precision": "bf16"}, "runs fp32, int8, fp16, not bf16"),
    ({"batch_size": 0}, "batch_size must be a whole number of at least 1"),
    ({"hash_check": "sha1"}, "hash_check must be one of full, size"),
    ({"reducing_gap": 0.5}, "reducing_gap must be 1.0 or more"),
    ({"max_image_pixels": -1}, "max_image_pixels must be"),
])
def test_bad_settings_are_refused_by_name(settings, says):
    with pytest.raises(PickScoreError, match=says.replace("(", r"\(").replace(")", r"\)")):
        ScorerOptions.of(**settings)


def test_options_are_frozen_plain_data_and_flat_settings_land_in_their_place():
    options = ScorerOptions.of(backend="tensorrt", batch_size=16, jpeg_draft=True, build=False, text_cache_file="c.db")
    assert options.decode == DecodeOptions(jpeg_draft=True) and options.backend_options == {"build": False}
    assert pickle.loads(pickle.dumps(options)) == options  # to Ray actors and server replicas
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.batch_size = 4
    again = options.replace(reducing_gap=2.0, batch_size=8)
    assert again.decode == DecodeOptions(jpeg_draft=True, reducing_gap=2.0) and again.batch_size == 8
    assert again.backend_options == {"build": False} and options.batch_size == 16


def test_score_and_serve_take_the_same_scorer_flags_and_build_the_same_options(tmp_path):
    parser = build_parser()
    score = parser.parse_args(["score", "--artifacts", str(tmp_path), "--prompt", "x", "a.png", "--backend", "onnx-cpu",
                               "--batch-size", "4", "--threads", "2", "--workers", "3", "--hash-check", "size",
                               "--text-cache", "t.db", "--max-image-pixels", "1000", "--jpeg-draft", "--reducing-gap", "2"])
    serve = parser.parse_args(["serve", "--artifacts", str(tmp_path), "--backend", "onnx-cpu", "--max-batch", "4",
                               "--threads", "2", "--workers", "3", "--hash-check", "size", "--text-cache", "t.db",
                               "--max-image-pixels", "1000", "--jpeg-draft", "--reducing-gap", "2"])
    want = ScorerOptions(backend="onnx-cpu", batch_size=4, threads=2, workers=3, hash_check="size", text_cache_file="t.db",
                         decode=DecodeOptions(max_image_pixels=1000, jpeg_draft=True, reducing_gap=2.0))
    assert ScorerOptions.from_args(score) == ScorerOptions.from_args(serve) == want


def test_the_server_and_the_ray_job_carry_the_options_type():
    from pickscore_runtime.scale.job import JobOptions
    from pickscore_runtime.server.config import ServerConfig

    for config_type in (ServerConfig, JobOptions):
        kinds = {f.name: f.type for f in dataclasses.fields(config_type)}
        assert "ScorerOptions" in str(kinds.values()), config_type
        assert not {"backend", "precision", "threads", "workers", "jpeg_draft"} & set(kinds), config_type
    options = ScorerOptions.of(jpeg_draft=True)
    assert JobOptions("a", options).identity("fp")["jpeg_draft"] is True  # what --resume checks


def test_load_applies_decode_settings_and_refuses_an_undeclared_option_before_opening(tiny_artifacts, monkeypatch):
    scorer = load_quietly(tiny_artifacts, precision="fp32", jpeg_draft=True, reducing_gap=3.0, workers=2)
    try:
        assert scorer.images.jpeg_draft and scorer.images.reducing_gap == 3.0 and scorer.workers == 2
    finally:
        scorer.close()
    import pickscore_runtime.artifacts as artifacts

    def must_not_load(*args, **kwargs):
        raise AssertionError("the artifacts were read before the options were checked")

    monkeypatch.setattr(artifacts.Artifacts, "load", must_not_load)
    with pytest.raises(PickScoreError, match="cuda_graphs"):
        load_quietly(tiny_artifacts, cuda_graphs=True)
