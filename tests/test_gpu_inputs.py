"""The GPU input paths' logic, checked on the CPU (issue 21, defects 2-4): a device array reaches ONNX
Runtime only after its producer's writes; a session ONNX Runtime quietly moved to the CPU, or an
onnxruntime-gpu without `use_tf32`, is refused; a tensor that requires grad is read, not a crash.
Fake sessions and bindings record the order of calls; real ONNX Runtime CPU sessions show what it does."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, save_model

from pickscore_runtime.backends import onnxruntime as ort_backend
from pickscore_runtime.backends.onnxruntime_io import BoundRunner
from pickscore_runtime.device_arrays import device_view, is_device_array
from pickscore_runtime.errors import BackendUnavailableError
from pickscore_runtime.ort_sessions import session_options

SPEC = SimpleNamespace(input=SimpleNamespace(name="x"), output=SimpleNamespace(name="y"))  # what BoundRunner reads


@pytest.fixture(scope="module")
def relu_model(tmp_path_factory) -> str:
    """A one-node ONNX model x -> relu(x), [n, 3] float32: a real session in milliseconds."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("relu") / "relu.onnx"
    save_model(model, str(path))
    return str(path)


class RecordingBinding:
    """An I/O binding (a real one, or none) that writes each call's name to `calls`."""

    def __init__(self, calls: list, inner=None):
        self.calls, self.inner = calls, inner

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            return getattr(self.inner, name)(*args) if self.inner else [np.zeros((1, 3), np.float32)]
        return call


class RecordingSession:
    """An ORT session (a real one, or none) whose binding calls and runs are written to `calls` in order."""

    def __init__(self, calls: list, real=None):
        self.calls, self.real = calls, real

    def io_binding(self) -> RecordingBinding:
        return RecordingBinding(self.calls, self.real.io_binding() if self.real else None)

    def run_with_iobinding(self, binding: RecordingBinding) -> None:
        self.calls.append("run_with_iobinding")
        if self.real:
            self.real.run_with_iobinding(binding.inner)


# ---- 2: stream ordering of bound device arrays ----------------------------------------------------------
def test_a_device_array_is_bound_after_its_producer_finished_writing():
    class Producer:  # a CUDA array interface v3 producer (CuPy, Numba, torch) with writes pending on its stream
        __cuda_array_interface__ = {"shape": (1, 3), "typestr": "<f4", "data": (0x7F0000000000, False),
                                    "strides": None, "version": 3, "stream": 0x5EED}

    calls: list = []
    BoundRunner(RecordingSession(calls), SPEC, "cuda").run(device_view(Producer()))
    # ORT's CUDA EP waits for no other stream: the host waits for the device before the run reads the memory
    assert calls.index("synchronize_inputs") < calls.index("run_with_iobinding")
    assert calls.index("bind_input") < calls.index("synchronize_inputs")
    calls.clear()
    BoundRunner(RecordingSession(calls), SPEC, "cuda").run(np.ones((1, 3), np.float32))
    assert "synchronize_inputs" not in calls  # a host array is copied by ORT itself, in order


def test_the_wait_keeps_real_sessions_results(relu_model):
    real = ort.InferenceSession(relu_model, session_options(), providers=["CPUExecutionProvider"])
    x = np.array([[-1.0, 0.5, 2.0], [3.0, -4.0, 0.0]], np.float32)
    calls: list = []
    got = BoundRunner(RecordingSession(calls, real), SPEC, "cpu").run(device_view(x))  # bound by pointer
    np.testing.assert_array_equal(got, np.maximum(x, 0))
    assert calls.index("synchronize_inputs") < calls.index("run_with_iobinding")


# ---- 3: the provider a session really runs on, and use_tf32's version ---------------------------------
def test_real_onnxruntime_falls_back_to_the_cpu_and_that_is_refused(relu_model):
    if "CUDAExecutionProvider" not in ort.get_available_providers():  # the CPU wheel (CI): onnx-cuda's own list
        wanted, name = ort_backend.providers("onnx-cuda"), "CUDAExecutionProvider"
    else:  # onnxruntime-gpu: a provider no NVIDIA build has
        wanted, name = [("MIGraphXExecutionProvider", {}), "CPUExecutionProvider"], "MIGraphXExecutionProvider"
    with pytest.warns(UserWarning, match=name):  # all ONNX Runtime says: a warning
        session = ort.InferenceSession(relu_model, session_options(), providers=wanted)
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.warns(UserWarning), pytest.raises(BackendUnavailableError, match=f"asked for {name} and runs the "
                                                                                  "session on CPUExecutionProvider"):
        ort_backend.checked_session(ort, relu_model, session_options(), wanted)
    cpu = ort_backend.checked_session(ort, relu_model, session_options(), ort_backend.providers("onnx-cpu"))
    assert cpu.get_providers() == ["CPUExecutionProvider"]


class FakeOrt:
    """onnxruntime-gpu as the backend sees it: its version, its providers, and sessions that run on
    `runs_on` (what ONNX Runtime picked); `falls_back(providers)` says which sessions fell back to the CPU."""

    def __init__(self, version: str, falls_back=lambda providers: False):
        self.__version__, self.falls_back, self.made = version, falls_back, []

    @staticmethod
    def get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def InferenceSession(self, model, options, providers):  # noqa: N802 (ORT's name)
        self.made.append(providers)
        runs_on = ["CPUExecutionProvider"] if self.falls_back(providers) else ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return SimpleNamespace(get_providers=lambda: runs_on)


def fake_artifacts():
    spec = SimpleNamespace(input=SimpleNamespace(name="x", shape=["batch", 3], dynamic_axes=lambda: ["batch"]),
                           output=SimpleNamespace(name="y", shape=["batch", 3]))
    return SimpleNamespace(specs=lambda: {"text": spec, "vision": spec}, tower_file=lambda tower, precision: f"{tower}.onnx")


def test_onnx_cuda_refuses_sessions_that_run_on_the_cpu(monkeypatch):
    fake = FakeOrt("1.20.1", falls_back=lambda providers: True)  # CUDA listed, but its libraries did not load
    monkeypatch.setattr(ort_backend, "require_onnxruntime", lambda *a: fake)
    with pytest.raises(BackendUnavailableError, match="asked for CUDAExecutionProvider and runs the session on CPU"):
        ort_backend.OnnxRuntimeBackend(fake_artifacts(), "onnx-cuda", "fp32", batch_size=4)
    fake = FakeOrt("1.20.1")
    monkeypatch.setattr(ort_backend, "require_onnxruntime", lambda *a: fake)
    backend = ort_backend.OnnxRuntimeBackend(fake_artifacts(), "onnx-cuda", "fp32", batch_size=4)
    assert backend.device == "cuda" and len(fake.made) == 2
    assert all(p[0] == ("CUDAExecutionProvider", {"device_id": "0", "use_tf32": "0"}) for p in fake.made)


def test_onnx_cuda_graph_bucket_sessions_are_checked_too(monkeypatch):
    fake = FakeOrt("1.20.1", falls_back=lambda providers: "enable_cuda_graph" in providers[0][1])
    monkeypatch.setattr(ort_backend, "require_onnxruntime", lambda *a: fake)
    with pytest.raises(BackendUnavailableError, match="runs the session on CPUExecutionProvider"):
        ort_backend.OnnxRuntimeBackend(fake_artifacts(), "onnx-cuda", "fp32", batch_size=4, cuda_graphs=True)


@pytest.mark.parametrize("version,refused", [("1.17.3", True), ("1.18.0", False), ("1.19.0.dev20240501", False),
                                             ("2.0.0", False)])
def test_onnx_cuda_needs_onnxruntime_gpu_1_18_for_use_tf32(monkeypatch, version, refused):
    fake = FakeOrt(version)
    monkeypatch.setattr(ort_backend, "require_onnxruntime", lambda *a: fake)
    reason = ort_backend.cuda_provider_missing()
    assert (reason is not None) == refused
    if refused:
        assert "1.18" in reason and "use_tf32" in reason
        with pytest.raises(BackendUnavailableError, match="predates 1.18"):
            ort_backend.OnnxRuntimeBackend(fake_artifacts(), "onnx-cuda", "fp32", batch_size=4)
        assert fake.made == []  # refused before any session passed it an option it does not know


# ---- 4: tensors that require grad, and protocols that raise ---------------------------------------------
def test_protocol_properties_that_raise_are_not_a_crash():
    class RefusesInterface:  # what torch does for a CUDA tensor that requires grad
        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")

    assert is_device_array(RefusesInterface()) is False
    with pytest.raises(TypeError, match="not a device array"):
        device_view(RefusesInterface())


def test_a_tensor_that_requires_grad_is_viewed_detached():
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    view = device_view(x)  # torch's __dlpack__ refuses a tensor that requires grad
    assert (view.ptr, view.shape, view.device) == (x.data_ptr(), (2, 3, 4, 4), "cpu")
    assert is_device_array(x) is False and x.requires_grad  # the caller's tensor is left as it was


def test_device_arrays_never_import_torch():
    code = ("import sys; from pickscore_runtime.device_arrays import is_device_array, device_view\n"
            "import numpy as np; assert not is_device_array(object()); device_view(np.zeros(3, np.float32))\n"
            "assert 'torch' not in sys.modules; print('NO_TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "NO_TORCH" in out.stdout, out.stderr[-2000:]

