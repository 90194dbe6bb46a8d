"""The optional `openvino` backend (pip extra [openvino], which [test] installs: nothing here skips): the same
lifecycle, input checks and gate as every backend, fp32 equal to onnx-cpu, bf16 and int8 saying what the CPU
really runs (OpenVINO falls back to f32 silently where the CPU has no BF16), int8 weights made at load in the
form OpenVINO's CPU plugin runs as int8, a non-finite item that stays that item's error, the runtime that
imports openvino only when this backend is chosen, a missing openvino that names its extra, and `auto`, which
picks its int8 only on a VNNI CPU and only where its own gate record, made on such a CPU, says it passed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import warnings
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


def test_registry_entry_derives_bf16_and_int8_from_the_fp32_files(artifacts, tmp_path):
    info = BACKENDS["openvino"]
    assert (info.device, info.extra, info.builds_from) == ("cpu", "openvino", "artifacts")
    assert info.precisions == ("fp32", "bf16", "int8") and info.auto_precisions == ("int8",)
    assert info.unavailable() is None  # [test] installs it
    assert resolve_precision(artifacts, info, None) == "fp32"  # the most accurate first
    assert resolve_precision(artifacts, info, "bf16") == "bf16"  # no bf16 towers: it reads the fp32 ones
    assert resolve_precision(artifacts, info, "int8") == "int8"
    assert (info.derives("int8"), info.derives("bf16"), info.derives("fp32")) == (True, True, False)
    assert (info.files_for("int8"), info.files_for("bf16")) == ("fp32", "fp32")
    with pytest.raises(BackendUnavailableError, match="runs fp32, bf16, int8, not fp16"):
        resolve_precision(artifacts, info, "fp16")
    assert resolve_precision(artifacts, BACKENDS["onnx-cpu"], None, auto=True) == "int8"  # nobody else reads bf16
    with pytest.raises(BackendUnavailableError, match="runs fp32, int8, fp16, not bf16"):
        resolve_precision(artifacts, BACKENDS["onnx-cpu"], "bf16")
    assert AUTO_ORDER.index("openvino") == AUTO_ORDER.index("onnx-cpu") - 1  # the CPU's first, where auto may take it
    # first use exports what it reads: bf16 and int8 come from the fp32 files
    assert first_use_plan("openvino", "bf16") == (["fp32", "int8"], "onnx-cpu")
    only_fp32 = tmp_path / "fp32"  # int8 from fp32 alone: the int8 ONNX is onnx-cpu's, not read here
    shutil.copytree(artifacts.root, only_fp32)
    manifest = json.loads((only_fp32 / "manifest.json").read_text())
    for tower in manifest["towers"].values():
        tower["precisions"] = {"fp32": tower["precisions"]["fp32"]}
    (only_fp32 / "manifest.json").write_text(json.dumps(manifest))
    assert resolve_precision(Artifacts.load(only_fp32, hash_check="size"), info, "int8") == "int8"


VNNI_CPU, AVX2_CPU = ["avx2", "avx512_bf16", "avx512_vnni", "avx512f", "fma"], ["avx2", "fma"]


def test_auto_takes_openvino_int8_only_on_a_vnni_cpu_with_its_own_gate_record_from_such_a_cpu(artifacts, tmp_path,
                                                                                               monkeypatch):
    """The CPU's flags are set here (monkeypatch of what /proc/cpuinfo said) so that both kinds of CPU are
    covered on whichever this machine is; the records are real gate.json files."""
    from pickscore_runtime.backends import registry
    from pickscore_runtime.gate_records import GateWarning, record_gate_results

    art = shutil.copytree(artifacts.root, tmp_path / "art")
    loaded = Artifacts.load(art, hash_check="size")
    passed = {"backend": "openvino", "precision": "int8", "passed": True, "failures": [], "gate_version": 3,
              "runs": "int8+fp32", "machine": {"simd": VNNI_CPU}}
    record_gate_results(art, loaded.fingerprint, [{**passed, "backend": "onnx-cpu", "machine": {"simd": VNNI_CPU}}])

    def auto() -> tuple[str, str]:
        info, precision, _ = select_backend(loaded, "auto")
        return info.name, precision

    monkeypatch.setattr(registry, "simd_flags", lambda: VNNI_CPU)
    # onnx-cpu's pass does not vouch for openvino's int8 (another computation): auto says how to gate it
    with pytest.warns(GateWarning, match="not int8 on openvino.*pickscore verify --artifacts .* --backend openvino "
                                         "--precision int8"):
        assert auto() == ("onnx-cpu", "int8")
    record_gate_results(art, loaded.fingerprint, [{**passed, "machine": {"simd": AVX2_CPU}}])
    with pytest.warns(GateWarning, match="made on a CPU with other SIMD flags \\(avx2, fma; here: avx2, avx512_bf16"):
        assert auto() == ("onnx-cpu", "int8")
    record_gate_results(art, loaded.fingerprint, [passed])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert auto() == ("openvino", "int8")
    monkeypatch.setattr(registry, "simd_flags", lambda: AVX2_CPU)  # measured faster on VNNI only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert auto() == ("onnx-cpu", "int8")
    # and openvino's pass does not vouch for onnx-cpu's int8 graph either: without its own, onnx-cpu serves fp32
    record_gate_results(art, loaded.fingerprint, [{**passed, "backend": "onnx-cpu", "passed": False, "failures": ["x"]}])
    with pytest.warns(GateWarning, match="not int8 on onnx-cpu"):
        assert resolve_precision(loaded, BACKENDS["onnx-cpu"], None, auto=True) == "fp32"
    (art / "gate.json").write_text(json.dumps({k: v for k, v in json.loads((art / "gate.json").read_text()).items()
                                               if k != "onnx-cpu/int8"}))
    with pytest.warns(GateWarning, match="not int8 on onnx-cpu: it has not passed"):
        assert resolve_precision(loaded, BACKENDS["onnx-cpu"], None, auto=True) == "fp32"
    record_gate_results(art, loaded.fingerprint, [{**passed, "backend": "onnx-cpu", "machine": {"simd": VNNI_CPU}}])
    monkeypatch.setattr(registry, "simd_flags", lambda: VNNI_CPU)
    record_gate_results(art, loaded.fingerprint, [{**passed, "passed": False, "failures": ["decisive pair flips 1 > 0"]}])
    with pytest.warns(GateWarning, match="not int8 on openvino.*decisive pair flips 1 > 0"):
        assert auto() == ("onnx-cpu", "int8")


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
    reads the compiled models back, so its rows say what ran. int8: every vision matmul holds int8 weights,
    the rest of that tower runs f32, and the text tower is fp32's."""
    images = pixels(3, artifacts.image_size, seed=2)
    with create_backend(artifacts, "onnx-cpu", "fp32") as ort_fp32:
        want_images, want_text = ort_fp32.embed_images(images), ort_fp32.embed_text(IDS[1])
    for precision in ("bf16", "int8"):
        with create_backend(artifacts, "openvino", precision) as backend:
            hint = backend.inference_precision["vision"]
            kernels = backend.kernel_precisions["vision"]
            if precision == "bf16":
                assert hint in ("bf16", "f32") and ("bf16" in kernels) == (hint == "bf16"), (hint, kernels)
                if not cpu_has_bf16():
                    assert hint == "f32"  # asked for bf16, runs f32
                assert backend.effective_precision == ("bf16" if hint == "bf16" else "fp32")
            else:
                assert backend.inference_precision == {"text": "f32", "vision": "f32"}
                assert backend.int8_matmuls == {"vision": kernels["int8"]} and kernels["int8"] > 0, kernels
                assert set(kernels) <= {"int8", "fp32"}, kernels
                assert backend.effective_precision in ("int8+fp32; text fp32", "int8+fp32 (int8 weights); text fp32")
                got = backend.embed_images(images)
                cosines = np.sum(got * want_images, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want_images, axis=1)
                assert cosines.min() > 0.999 and np.abs(got - want_images).max() > 0, cosines  # int8: close, not equal
                np.testing.assert_allclose(backend.embed_text(IDS[1]), want_text, rtol=0, atol=1e-5)  # fp32 text
            assert backend.effective_precision in repr(backend)


def test_int8_weights_are_what_the_plugin_multiplies():
    """openvino_weights on a model of its own: one int8 scale per output column, in the form the CPU plugin
    keeps int8. With dynamic quantisation off the result is exactly x @ (q * scale) in f32; with it on (the
    backend's setting) within what 8-bit activations allow; a zero column and transpose_b are handled."""
    import openvino as ov
    import openvino.opset13 as ops

    from pickscore_runtime.backends.openvino_weights import ACTIVATION_GROUP, compress_matmul_weights, int8_columns

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 256)).astype(np.float32)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    w[:, 3] = 0.0
    w_t = rng.standard_normal((48, 256)).astype(np.float32)  # [N, K] for transpose_b
    inp = ops.parameter([-1, 5, 256], np.float32)
    first = ops.matmul(inp, ops.constant(w), False, False)
    second = ops.matmul(inp, ops.constant(w_t), False, True)
    model = ov.Model([first, second], [inp])
    assert compress_matmul_weights(model, keep=lambda shape: shape == (48, 256)) == 1  # kept: left alone
    assert compress_matmul_weights(model) == 1  # the other one now; the rewritten one is no fp32 constant any more
    q, scale = int8_columns(w, reduce_axis=0)
    q_t, scale_t = int8_columns(w_t, reduce_axis=1)
    assert q.dtype == np.int8 and scale.shape == (1, 64) and scale[0, 3] == 1.0 and not q[:, 3].any()
    assert np.abs(q).max() == 127 and np.abs(q * scale - w).max() <= scale.max() / 2 + 1e-7
    core = ov.Core()

    def activation_bound(weights: np.ndarray) -> np.ndarray:
        """The most 8-bit activations with one scale per token and group of ACTIVATION_GROUP channels can move
        x @ weights: half a step (max |x| of the group / 127) times the group's |weights|, summed over groups."""
        groups = x.reshape(*x.shape[:-1], -1, ACTIVATION_GROUP)
        half_steps = np.abs(groups).max(axis=-1) / 127 / 2
        return half_steps @ np.abs(weights).reshape(-1, ACTIVATION_GROUP, weights.shape[1]).sum(axis=1)

    for group in (0, ACTIVATION_GROUP):
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                      "DYNAMIC_QUANTIZATION_GROUP_SIZE": group})
        out = compiled({0: x})
        for got, weights in ((out[0], q * scale), (out[1], (q_t * scale_t).T)):
            error = np.abs(got - x @ weights)
            if group == 0:  # int8 weights widened to f32: exactly x @ (q * scale)
                assert error.max() < 1e-4, error.max()
            elif cpu_model_and_flags()[1] & {"avx512_vnni", "amx_int8"}:  # where it was measured (issue 22)
                assert np.all(error <= activation_bound(weights) * 1.01 + 1e-4), (error / activation_bound(weights)).max()
                assert error.max() > 1e-3  # the activations were quantised: the int8 path ran
            else:  # never measured without VNNI (u8 x s8 with 16-bit sums may saturate there): gross errors only
                assert np.all(error <= activation_bound(weights) * 5 + 1e-4), (error / activation_bound(weights)).max()
    assert any(str(op.get_rt_info()["runtimePrecision"].astype(str)) in ("i8", "u8")
               for op in compiled.get_runtime_model().get_ordered_ops()
               if str(op.get_rt_info()["layerType"].astype(str)) == "FullyConnected")


def test_gate_v3_passes_for_every_precision_against_the_reference(tiny_artifacts, tiny_source):
    """Gate v3 as `pickscore verify --backend openvino` runs it (the transformers reference once, fp32): fp32
    passes, int8 keeps every order the gate checks. On a CPU without BF16 the bf16 report is an fp32 run (see the test above) and passes; where it
    really runs bf16 it fails on max |Δscore|, as at full size (benchmarks/QUANTIZATION.md)."""
    from pickscore_export.verify import verify_precisions

    reports = verify_precisions(tiny_artifacts, ["fp32", "bf16", "int8"], tiny_source, backend="openvino")
    by = {r["precision"]: r for r in reports}
    assert all(r["backend"] == "openvino" and r["gate_version"] == 3 for r in reports)
    for precision, report in by.items():
        assert report["nonfinite_outputs"] == 0
        if precision == "bf16" and cpu_has_bf16():
            continue  # OpenVINO's whole-graph bf16 (LayerNorm and softmax too) fails the gate here, as at full size
        if precision == "int8":
            # the tiny model's 64-wide activations get one scale per token (the group is 128 channels): every
            # order the gate checks holds, and |Δscore| ends near the tolerance (0.28 on a VNNI CPU; 0.13 at
            # full size, where it passes gate v3 on plain and stress weights: benchmarks/QUANTIZATION.md)
            assert report["resolved_pair_agreement"] >= 0.995 and report["decisive_pair_flips"] == 0, report["failures"]
            assert report["decisive_top1_agreement"] == 1.0 and report["max_abs_score_diff"] < 0.4, report["failures"]
            continue
        assert report["passed"], (precision, report["failures"])
    fp32 = by["fp32"]
    assert fp32["rank_agreement"] == 1.0 and fp32["max_abs_image_embed_diff"] < 1e-5 and fp32["max_abs_text_embed_diff"] < 1e-5
    assert by["int8"]["max_abs_text_embed_diff"] < 1e-5  # int8 is a vision plan: the text tower is fp32's
    assert by["int8"]["runs"].startswith("int8+fp32"), by["int8"]["runs"]
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
