"""The backend registry: precision resolution, `auto`, errors for what cannot run here, the lifecycle,
the overlap seam, input checks before anything runs, and the torch backend against the reference."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest

from helpers import load_quietly, run_cli
from pickscore_runtime.artifacts import Artifacts
from pickscore_runtime.backends import AUTO_ORDER, BACKENDS, GateWarning, create_backend, resolve_precision, select_backend
from pickscore_runtime.backends.base import BackendInputError, Done
from pickscore_runtime.errors import BackendUnavailableError, MissingExtraError, PickScoreError
from pickscore_runtime.inflight import InFlight, embed_in_flight


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
    def eligible(name: str) -> bool:  # runs here, auto does not pass it over on this CPU, and a precision is gated
        info = BACKENDS[name]
        if info.unavailable() or (info.auto_skips and info.auto_skips()):
            return False
        try:
            resolve_precision(artifacts, info, None, auto=True)
        except BackendUnavailableError:
            return False
        return True

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GateWarning)
        info, precision, why = select_backend(artifacts, "auto")
        runnable = [name for name in AUTO_ORDER if eligible(name)]
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


def pixels(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def test_lifecycle_and_batches_in_flight_match_the_reference(artifacts):
    """Batches submitted together and collected late (out of order, and through the in-flight helper) are
    each their own rows of the PyTorch reference (the torch backend: the model card's code path, itself
    checked against transformers below). On the CPU submit_images computes before it returns; the GPU
    backends' real overlap is checked in test_gpu.py (gpu-marked)."""
    pytest.importorskip("torch")
    x = pixels(5)
    with create_backend(artifacts, "torch", "fp32", batch_size=2) as reference:
        want = reference.embed_images(x)
    with create_backend(artifacts, "onnx-cpu", "fp32", batch_size=2) as backend:
        assert (backend.name, backend.precision, backend.device, backend.batch_size) == ("onnx-cpu", "fp32", "cpu", 2)
        held = [backend.submit_images(x[i:i + 2]) for i in (0, 2, 4)]
        got = [h.result() for h in reversed(held)][::-1]
        # the exported fp32 graph vs eager PyTorch, tiny random CLIP: max |diff| 8.9e-8 measured (AMD EPYC, AVX2 +
        # FMA); 1e-6 leaves room for other SIMD paths and still fails a mixed-up or stale batch (two images'
        # embeddings differ by 0.016-0.03 here)
        np.testing.assert_allclose(np.concatenate(got), want, rtol=0, atol=1e-6)
        flown = np.concatenate(list(embed_in_flight(backend, (x[i:i + 2] for i in (0, 2, 4)))))
        np.testing.assert_array_equal(flown, np.concatenate(got))
    backend.close()  # idempotent


class ScriptedBackend:
    """Just the overlap seam: records when each batch is submitted and collected."""

    def __init__(self, queue_depth: int):
        self.queue_depth, self.events = queue_depth, []

    def submit_images(self, batch):
        self.events.append(f"submit {batch}")
        backend = self

        class Pending:
            def result(self):
                backend.events.append(f"collect {batch}")
                return np.array([[batch]], np.float32)
        return Pending()


@pytest.mark.parametrize("depth,order", [
    (1, ["submit 0", "collect 0", "submit 1", "collect 1", "submit 2", "collect 2"]),
    (2, ["submit 0", "submit 1", "collect 0", "submit 2", "collect 1", "collect 2"]),  # one batch always overlaps
    (3, ["submit 0", "submit 1", "submit 2", "collect 0", "collect 1", "collect 2"]),
])
def test_in_flight_keeps_queue_depth_batches_submitted(depth, order):
    backend = ScriptedBackend(depth)
    assert [float(e[0, 0]) for e in embed_in_flight(backend, range(3))] == [0, 1, 2]
    assert backend.events == order
    flight = InFlight(0)  # a backend that says 0 still gets each batch collected
    flight.put("a", Done(np.zeros(1)))
    assert [tag for tag, _ in flight.due()] == ["a"] and len(flight) == 0


BAD_IMAGES = [
    (pixels(2).astype(np.float64), "pixel_values: expected dtype float32, got float64"),
    (np.zeros((2, 3, 224, 224), np.uint8), "pixel_values: expected dtype float32, got uint8"),
    (pixels(2, size=200), r"pixel_values: axis 2 must be 224, got shape \(2, 3, 200, 200\)"),
    (pixels(1)[0], r"pixel_values: expected rank 4"),
    (pixels(0), r"pixel_values: empty batch \(shape \(0, 3, 224, 224\)\)"),
    (pixels(2).tolist(), "pixel_values: expected a numpy array.*, got list"),
]
BAD_IDS = [
    (np.full((2, 5), 7, np.int32), "input_ids: expected dtype int64, got int32"),
    (np.full(5, 7, np.int64), "input_ids: expected rank 2"),
    (np.zeros((0, 5), np.int64), "input_ids: empty batch"),
    (np.full((2, 78), 7, np.int64), r"input_ids: sequence axis must be in \[2, 77\], got 78"),
    (np.full((1025, 5), 7, np.int64), r"input_ids: batch axis must be in \[1, 1024\], got 1025"),
]


@pytest.mark.parametrize("name,precision", [("onnx-cpu", "fp32"), ("onnx-cpu", "int8"), ("torch", "fp32")])
def test_every_backend_refuses_a_bad_input_before_running(artifacts, name, precision):
    """Polygraphy's BaseRunner: the base class checks each input once against the towers' declared IO, then
    calls the backend's own inference; a bad input names what is wrong and nothing runs."""
    if BACKENDS[name].unavailable():
        pytest.skip(BACKENDS[name].unavailable())
    with create_backend(artifacts, name, precision, batch_size=2) as backend:
        ran = []
        for method in ("_infer_text", "_infer_images", "_submit_images"):  # spies on the real methods
            real = getattr(backend, method)
            setattr(backend, method, lambda x, real=real, method=method: ran.append(method) or real(x))
        for entry in (backend.embed_images, backend.submit_images):
            for x, message in BAD_IMAGES:
                with pytest.raises(BackendInputError, match=message) as e:
                    entry(x)
                assert isinstance(e.value, PickScoreError)  # the CLI's one-line error, no traceback
        for x, message in BAD_IDS:
            with pytest.raises(BackendInputError, match=message):
                backend.embed_text(x)
        assert ran == []
        assert backend.embed_images(pixels(1)).shape == backend.embed_text(np.array([[49406, 49407]])).shape
        assert ran[0] == "_infer_images" and ran[-1] == "_infer_text"  # the spies do see a good input run


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
