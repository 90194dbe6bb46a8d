"""GPU paths. They run only where ONNX Runtime has the CUDA provider (onnxruntime-gpu on an NVIDIA box)."""

from __future__ import annotations

import pytest

onnxruntime = pytest.importorskip("onnxruntime")
HAS_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDAExecutionProvider in this onnxruntime build (needs onnxruntime-gpu and an NVIDIA GPU)")]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_cuda_passes_the_gate(tiny_artifacts, precision):
    from pickscore_export.verify import verify

    report = verify(tiny_artifacts, backend="onnx-cuda", precision=precision)
    assert report["backend"] == "onnx-cuda" and report["passed"], report["failures"]


def test_auto_prefers_cuda_fp16(tiny_artifacts):
    from pickscore_runtime import PickScorer

    scorer = PickScorer.load(tiny_artifacts, backend="auto")
    assert (scorer.backend.name, scorer.backend.precision) == ("onnx-cuda", "fp16")
