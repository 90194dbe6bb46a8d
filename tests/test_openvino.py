"""The optional `openvino` backend (pip extra [openvino], which [test] installs: nothing here skips): the same
lifecycle, input checks and gate as every backend, fp32 equal to onnx-cpu, bf16 and int8 saying what the CPU
really runs (OpenVINO falls back to f32 silently where the CPU has no BF16), a non-finite item that stays
that item's error, the runtime that imports openvino only when this backend is chosen, a missing openvino
that names its extra, and `auto`, which does not pick it (issue 22: that needs BF16/VNNI measurements)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from helpers import load_quietly, pixel_threshold, plant_nonfinite
from pickscore_runtime.artifacts import Artifacts
from pickscore_runtime.backends import AUTO_ORDER, BACKENDS, create_backend, resolve_precision, select_backend
from pickscore_runtime.backends.base import BackendInputError
from pickscore_runtime.errors import BackendUnavailableError, PickScoreError
from pickscore_runtime.export_cache import first_use_plan
from pickscore_runtime.machine import cpu_model_and_flags

IDS = [np.array([[49406, 320, 2368, 49407]], np.int64), np.array([[49406, 320, 1929, 539, 320, 2368, 49407]] * 3, np.int64)]


@pytest.fixture(scope="module")
def artifacts(tiny_artifacts) -> Artifacts:
    return Artifacts.load(tiny_artifacts, hash_check="size")


def pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def cpu_has_bf16() -> bool:
    return bool(cpu_model_and_flags()[1] & {"avx512_bf16", "amx_bf16"})


def test_registry_entry_resolves_bf16_from_the_fp32_files_and_auto_leaves_it_alone(artifacts):
    info = BACKENDS["openvino"]
    assert (info.device, info.extra, info.builds_from) == ("cpu", "openvino", "artifacts")
    assert info.precisions == ("fp32", "bf16", "int8")
    assert info.unavailable() is None  # [test] installs it
    assert resolve_precision(artifacts, info, None) == "fp32"  # the most accurate first
    assert resolve_precision(artifacts, info, "bf16") == "bf16"  # no bf16 towers: it reads the fp32 ones
    assert resolve_precision(artifacts, info, "int8") == "int8"
    with pytest.raises(BackendUnavailableError, match="runs fp32, bf16, int8, not fp16"):
        resolve_precision(artifacts, info, "fp16")
    assert resolve_precision(artifacts, BACKENDS["onnx-cpu"], None, auto=True) == "int8"  # nobody else reads bf16
    with pytest.raises(BackendUnavailableError, match="runs fp32, int8, fp16, not bf16"):
        resolve_precision(artifacts, BACKENDS["onnx-cpu"], "bf16")
    # auto does not pick openvino until it is measured and gated on a BF16/VNNI CPU (issue 22)
    assert "openvino" not in AUTO_ORDER and select_backend(artifacts, "auto")[0].name != "openvino"
    # first use exports what it reads: bf16 is not an exported precision
    assert first_use_plan("openvino", "bf16") == (["fp32", "int8"], "onnx-cpu")


def test_fp32_equals_onnx_cpu_with_dynamic_batches_and_the_lifecycle(artifacts):
    size = artifacts.image_size
    images = pixels(5, size)
    with create_backend(artifacts, "onnx-cpu", "fp32") as ort:
        want_images, want_text = ort.embed_images(images), [ort.embed_text(ids) for ids in IDS]
    backend = create_backend(artifacts, "openvino", "fp32", batch_size=2, threads=1)
    assert (backend.name, backend.precision, backend.device, backend.batch_size) == ("openvino", "fp32", "cpu", 2)
    assert backend.inference_precision == {"text": "f32", "vision": "f32"} and backend.effective_precision == "fp32"
    assert all(c.get_property("INFERENCE_NUM_THREADS") == 1 for c in backend._compiled.values())
    assert all(str(c.get_property("PERFORMANCE_HINT")).endswith("LATENCY") for c in backend._compiled.values())
    # one compiled model per tower, dynamic batch: batches of 1, 2 and 2 (collected late), then 5 at once
    held = [backend.submit_images(images[i:i + 2]) for i in (0, 2)] + [backend.submit_images(images[4:5])]
    got = np.concatenate([h.result() for h in held])
    assert got.dtype == np.float32 and got.shape == want_images.shape
    np.testing.assert_allclose(got, want_images, rtol=0, atol=1e-5)
    np.testing.assert_allclose(backend.embed_images(images), want_images, rtol=0, atol=1e-5)
    for ids, want in zip(IDS, want_text):  # dynamic batch and sequence length
        out = backend.embed_text(ids)
        assert out.dtype == np.float32 and out.shape == (len(ids), artifacts.embed_dim)
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
    first = backend.embed_images(images[:1])
    backend.embed_images(images[1:3])  # the request reuses its output buffer: an earlier result must not change
    np.testing.assert_array_equal(first, backend.embed_images(images[:1]))
    with backend:
        pass  # __exit__ closes
    for call, x in ((backend.embed_images, images[:1]), (backend.embed_text, IDS[0]), (backend.submit_images, images[:1])):
        with pytest.raises(PickScoreError, match="this openvino backend is closed"):
            call(x)
    backend.close()  # idempotent


def test_one_backend_from_many_threads(artifacts):
    images = pixels(6, artifacts.image_size, seed=1)
    with create_backend(artifacts, "openvino", "fp32", batch_size=2) as backend:
        want = [backend.embed_images(images[i:i + 2]) for i in (0, 2, 4)]
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda i: backend.embed_images(images[i:i + 2]), [0, 2, 4] * 4))
    for k, out in enumerate(got):
        np.testing.assert_array_equal(out, want[k % 3])


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_bad_input_is_refused_before_anything_runs(artifacts, precision):
    with create_backend(artifacts, "openvino", precision) as backend:
        ran = []
        for method in ("_infer_text", "_infer_images", "_submit_images"):
            real = getattr(backend, method)
            setattr(backend, method, lambda x, real=real, method=method: ran.append(method) or real(x))
        for x, message in [(pixels(2, artifacts.image_size).astype(np.float64), "expected dtype float32, got float64"),
                           (pixels(0, artifacts.image_size), "empty batch"),
                           (pixels(1, artifacts.image_size + 8), "axis 2 must be")]:
            with pytest.raises(BackendInputError, match=message):
                backend.embed_images(x)
        with pytest.raises(BackendInputError, match="expected dtype int64, got int32"):
            backend.embed_text(IDS[0].astype(np.int32))
        assert ran == []


def test_bf16_and_int8_say_what_this_cpu_runs(artifacts):
    """OpenVINO takes a bf16 hint on any CPU and runs f32 where the CPU has no AVX512-BF16 or AMX: the backend
    reads the compiled models back, so its rows say what ran. The int8 ONNX (ONNX Runtime's dynamic
    quantisation) loads; where its integer matmuls run on float kernels it says so."""
    images = pixels(3, artifacts.image_size, seed=2)
    with create_backend(artifacts, "onnx-cpu", "int8") as ort_int8:
        want_int8 = ort_int8.embed_images(images)
    for precision in ("bf16", "int8"):
        with create_backend(artifacts, "openvino", precision) as backend:
            hint = backend.inference_precision["vision"]
            kernels = backend.kernel_precisions["vision"]
            assert hint in ("bf16", "f32") and ("bf16" in kernels) == (hint == "bf16"), (hint, kernels)
            if not cpu_has_bf16():
                assert hint == "f32"  # asked for bf16, runs f32
            if precision == "bf16":
                assert backend.effective_precision == ("bf16" if hint == "bf16" else "fp32")
            else:
                assert "int8" in kernels or backend.effective_precision.endswith("(int8 emulated)")
                if hint == "f32":  # the same quantised arithmetic as ONNX Runtime's int8, f32 elsewhere
                    np.testing.assert_allclose(backend.embed_images(images), want_int8, rtol=0, atol=2e-3)
            assert backend.effective_precision in repr(backend)


def test_gate_v3_passes_for_every_precision_against_the_reference(tiny_artifacts, tiny_source):
    """Gate v3 as `pickscore verify --backend openvino` runs it (the transformers reference once, fp32). On a
    CPU without BF16 the bf16 report is an fp32 run (see the test above)."""
    from pickscore_export.verify import verify_precisions

    reports = verify_precisions(tiny_artifacts, ["fp32", "bf16", "int8"], tiny_source, backend="openvino")
    by = {r["precision"]: r for r in reports}
    assert all(r["backend"] == "openvino" and r["gate_version"] == 3 for r in reports)
    for precision, report in by.items():
        assert report["passed"], (precision, report["failures"])
        assert report["nonfinite_outputs"] == 0
    fp32 = by["fp32"]
    assert fp32["rank_agreement"] == 1.0 and fp32["max_abs_image_embed_diff"] < 1e-5 and fp32["max_abs_text_embed_diff"] < 1e-5
    assert by["int8"]["max_abs_text_embed_diff"] < 1e-5  # int8 is a vision plan: the text tower is fp32's
    assert fp32["runs"] == "fp32"  # the report says what ran: bf16 is "fp32" where the CPU has no BF16
    assert by["bf16"]["runs"] == ("bf16" if cpu_has_bf16() else "fp32"), by["bf16"]["runs"]


def test_a_nonfinite_item_is_that_items_error(tiny_artifacts, tmp_path):
    white = np.full((64, 64, 3), 255, np.uint8)
    noise = [np.random.default_rng(k).integers(0, 256, (64, 64, 3), dtype=np.uint8) for k in range(3)]
    poisoned = plant_nonfinite(tiny_artifacts, tmp_path / "poisoned", tower="vision",
                               when=pixel_threshold(tiny_artifacts, [white], noise))
    clean = load_quietly(tiny_artifacts, backend="openvino", precision="fp32")
    scorer = load_quietly(poisoned, backend="openvino", precision="fp32")
    try:
        result = scorer.score("a cat", [noise[0], white, noise[1], noise[2]])
        want = clean.score("a cat", [noise[0], noise[1], noise[2]])
    finally:
        scorer.close()
        clean.close()
    bad = result.results[1]
    assert bad.score is None and "vision tower returned non-finite values" in bad.error
    kept = [result.results[j] for j in (0, 2, 3)]
    np.testing.assert_allclose([r.score for r in kept], want.scores, atol=2e-5)
    assert all(r.error is None for r in kept)


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "ignore", "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_openvino_is_imported_only_when_chosen(tiny_artifacts):
    out = run(f"""
        import sys
        from pickscore_runtime import PickScorer
        s = PickScorer.load({str(tiny_artifacts)!r}, backend="auto")
        s.score("a cat", [__import__("numpy").zeros((32, 32, 3), "uint8")])
        assert "openvino" not in sys.modules
        s = PickScorer.load({str(tiny_artifacts)!r}, backend="openvino", precision="bf16")
        assert "openvino" in sys.modules
        print("OV_OK", s.backend.name, s.backend.precision)
    """)
    assert out.returncode == 0 and "OV_OK openvino bf16" in out.stdout, out.stderr[-3000:]


def test_a_missing_openvino_names_the_extra(tiny_artifacts):
    out = run(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "openvino" or name.startswith("openvino."):
                    raise ImportError("blocked: " + name, name=name)
        sys.meta_path.insert(0, Block())
        from pickscore_runtime.artifacts import Artifacts
        from pickscore_runtime.backends import BACKENDS, create_backend
        from pickscore_runtime.backends.openvino import create
        from pickscore_runtime.errors import BackendUnavailableError, MissingExtraError
        assert BACKENDS["openvino"].unavailable() == "openvino not installed", BACKENDS["openvino"].unavailable()
        artifacts = Artifacts.load({str(tiny_artifacts)!r}, hash_check="size")
        try:
            create_backend(artifacts, "openvino")
        except BackendUnavailableError as e:
            print("PROBE", e)
        try:
            create(artifacts, "openvino", "fp32", 8)
        except MissingExtraError as e:
            print("MISSING", e.extra, e)
    """)
    assert "PROBE backend openvino cannot run here: openvino not installed (pip extra [openvino])" in out.stdout, out.stderr[-2000:]
    assert "MISSING openvino backend openvino needs openvino, which is not installed: " \
           "pip install 'pickscore-runtime[openvino]'" in out.stdout, out.stdout + out.stderr[-2000:]


def test_bench_and_its_table_say_what_a_bf16_row_ran(artifacts, tmp_path):
    from pickscore_runtime.bench import markdown_table, run_bench

    result = run_bench(artifacts.root, ["openvino:fp32", "openvino:bf16"], [1], ["vision"], min_calls=1,
                       min_seconds=0.0, progress=lambda _: None)
    rows = {r["precision"]: r for r in result["rows"]}
    assert rows["fp32"]["runs"] is None  # ran what it was asked for
    assert rows["bf16"]["runs"] == (None if cpu_has_bf16() else "fp32")
    if not cpu_has_bf16():
        assert "bf16 (runs fp32)" in markdown_table(result)
