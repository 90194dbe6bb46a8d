"""The backend registry: precision resolution, `auto`, errors for what cannot run here, the lifecycle,
the overlap seam, and the torch backend against the reference."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from helpers import load_quietly, run_cli
from pickscore_runtime.artifacts import Artifacts
from pickscore_runtime.backends import AUTO_ORDER, BACKENDS, create_backend, resolve_precision, select_backend
from pickscore_runtime.errors import BackendUnavailableError, MissingExtraError


@pytest.fixture(scope="module")
def artifacts(tiny_artifacts) -> Artifacts:
    return Artifacts.load(tiny_artifacts, hash_check="size")


@pytest.mark.parametrize("backend,asked,auto,want", [
    ("onnx-cpu", None, False, "fp32"),  # an explicit backend gets its most accurate precision
    ("onnx-cpu", None, True, "int8"),  # auto on a CPU takes the fast path when exported
    ("onnx-cpu", "fp16", False, "fp16"),
    ("onnx-cuda", None, False, "fp16"),  # GPU backends prefer fp16
    ("tensorrt", None, True, "fp16"),
    ("torch", None, False, "fp32"),  # built from weights: runs any of its own precisions
    ("torch", "bf16", False, "bf16"),
    ("torch-cuda", None, True, "fp16"),
])
def test_precision_resolution(artifacts, backend, asked, auto, want):
    assert resolve_precision(artifacts, BACKENDS[backend], asked, auto) == want


def test_precision_errors_name_the_fix(artifacts, tmp_path):
    with pytest.raises(BackendUnavailableError, match="runs fp16, fp32, not int8"):
        resolve_precision(artifacts, BACKENDS["onnx-cuda"], "int8")
    with pytest.raises(BackendUnavailableError, match="runs fp32, int8, fp16, not bf16"):
        resolve_precision(artifacts, BACKENDS["onnx-cpu"], "bf16")
    only_fp32 = Artifacts(artifacts.root, {**artifacts.manifest, "towers": {
        t: {**s, "precisions": {"fp32": s["precisions"]["fp32"]}} for t, s in artifacts.manifest["towers"].items()}})
    with pytest.raises(BackendUnavailableError, match=r"no int8 towers .* `pickscore export --precision int8`"):
        resolve_precision(only_fp32, BACKENDS["onnx-cpu"], "int8")
    assert resolve_precision(only_fp32, BACKENDS["onnx-cpu"], None, auto=True) == "fp32"


def test_auto_takes_the_first_backend_that_can_run_here(artifacts):
    info, precision, why = select_backend(artifacts, "auto")
    runnable = [name for name in AUTO_ORDER if BACKENDS[name].unavailable() is None]
    assert info.name == runnable[0]
    assert precision == BACKENDS[info.name].auto_precisions[0]
    for skipped in AUTO_ORDER[: AUTO_ORDER.index(info.name)]:
        assert skipped in why  # says what it skipped and why


def test_unknown_or_unavailable_backends(artifacts):
    with pytest.raises(BackendUnavailableError, match="unknown backend 'nope'"):
        create_backend(artifacts, "nope")
    for name, info in BACKENDS.items():
        reason = info.unavailable()
        if reason is None:
            continue
        with pytest.raises(BackendUnavailableError, match=f"backend {name} cannot run here: .*{info.extra}"):
            create_backend(artifacts, name)


@pytest.mark.skipif(BACKENDS["tensorrt"].unavailable() is None, reason="TensorRT can run here")
def test_unavailable_backend_from_the_cli_exits_2_naming_the_extra(tiny_artifacts, sample_images):
    out = run_cli("score", "--artifacts", str(tiny_artifacts), "--backend", "tensorrt", "--prompt", "a cat",
                  str(sample_images[0]))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "backend tensorrt cannot run here" in out.stderr and "[tensorrt]" in out.stderr


def test_missing_extra_is_one_error_naming_it():
    from pickscore_runtime.optional import require

    with pytest.raises(MissingExtraError, match=r"Parquet output needs no_such_module_xyz.*\[parquet\]"):
        require("no_such_module_xyz", "Parquet output", extra="parquet")
    if importlib.util.find_spec("tensorrt") is None:  # the extra comes from the table when not given
        with pytest.raises(MissingExtraError, match=r"engines needs tensorrt.*pip install 'pickscore-runtime\[tensorrt\]'"):
            require("tensorrt", "engines")


def test_lifecycle_and_overlap_seam(artifacts):
    pixels = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
    with create_backend(artifacts, "onnx-cpu", "fp32", batch_size=2) as backend:
        assert (backend.name, backend.precision, backend.device, backend.batch_size) == ("onnx-cpu", "fp32", "cpu", 2)
        direct = backend.embed_images(pixels)
        pending = backend.submit_images(pixels)
        np.testing.assert_array_equal(pending.result(), direct)
    backend.close()  # idempotent


def test_torch_backend_is_the_reference_and_bf16_is_close(tiny_artifacts, tiny_reference, sample_images):
    fp32 = load_quietly(tiny_artifacts, backend="torch")
    bf16 = load_quietly(tiny_artifacts, backend="torch", precision="bf16")
    paths = [str(p) for p in sample_images[:4]]
    want = tiny_reference.image_embeddings(sample_images[:4])
    np.testing.assert_allclose(fp32.embed_images(paths), want, atol=1e-5)
    cos = (bf16.embed_images(paths) * want).sum(1)
    assert cos.min() > 0.99  # autocast bf16: close, not equal
    assert (fp32.backend.name, fp32.backend.precision, bf16.backend.precision) == ("torch", "fp32", "bf16")
    fp32.close()
    bf16.close()


def test_one_scorer_from_many_threads(tiny_scorer, sample_images):
    from concurrent.futures import ThreadPoolExecutor

    paths = [str(p) for p in sample_images]
    alone = {i: tiny_scorer.score(f"prompt {i}", paths[i:i + 4]).scores for i in range(8)}
    with ThreadPoolExecutor(8) as pool:
        together = dict(zip(range(8), pool.map(lambda i: tiny_scorer.score(f"prompt {i}", paths[i:i + 4]).scores, range(8))))
    for i in range(8):
        np.testing.assert_allclose(together[i], alone[i], atol=1e-5)
