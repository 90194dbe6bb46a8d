"""The reward changes no process-wide torch state, so it can live in a trainer's process (colocated on its
GPU): loading the tiny model with the torch backend and scoring a float batch that requires grad leave
torch's threads, grad and inference modes, default dtype and device, determinism, matmul precision,
backend flags, CPU autocast and RNG exactly as they were; the batch gets no .grad and the scores are numpy
(no autograd graph). The one process-wide setting is asked for by name: `threads=N` on the CPU backend
`torch` (torch has no per-model threads); torch-cuda ignores it. All on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import load_quietly
from pickscore_runtime.backends.torch_backend import TorchBackend

RAISES = "raises"


def read(getter):
    """A setting's value, or (RAISES, the exception's type) where reading it raises (torch >= 2.9's legacy TF32
    getters after the new API was used): a change either way shows."""
    try:
        return getter()
    except Exception as e:  # noqa: BLE001 - recorded as the state
        return RAISES, type(e).__name__


def torch_state() -> dict:
    """Every process-wide torch setting a library could change under a trainer, as comparable values."""
    b = torch.backends
    getters = {
        "num_threads": torch.get_num_threads,
        "num_interop_threads": torch.get_num_interop_threads,
        "grad_enabled": torch.is_grad_enabled,
        "inference_mode": torch.is_inference_mode_enabled,
        "default_dtype": torch.get_default_dtype,
        "deterministic": torch.are_deterministic_algorithms_enabled,
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled,
        "float32_matmul_precision": torch.get_float32_matmul_precision,
        "anomaly": torch.is_anomaly_enabled,
        "autocast_cpu": lambda: torch.is_autocast_enabled("cpu"),
        "autocast_cpu_dtype": lambda: torch.get_autocast_dtype("cpu"),
        "cudnn.enabled": lambda: b.cudnn.enabled,
        "cudnn.benchmark": lambda: b.cudnn.benchmark,
        "cudnn.deterministic": lambda: b.cudnn.deterministic,
        "cudnn.allow_tf32": lambda: b.cudnn.allow_tf32,
        "mkldnn.enabled": lambda: b.mkldnn.enabled,
        "cuda.matmul.allow_tf32": lambda: b.cuda.matmul.allow_tf32,
        "cuda.matmul.fp16_reduced": lambda: b.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "cuda.matmul.bf16_reduced": lambda: b.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "sdpa.flash": b.cuda.flash_sdp_enabled,
        "sdpa.mem_efficient": b.cuda.mem_efficient_sdp_enabled,
        "sdpa.math": b.cuda.math_sdp_enabled,
    }
    optional = {  # not in every torch version
        "default_device": "get_default_device", "cudnn_sdp": "cudnn_sdp_enabled", "fp32_precision": "fp32_precision",
        "mkldnn.fp32_precision": "mkldnn.fp32_precision", "cuda.matmul.fp32_precision": "cuda.matmul.fp32_precision",
    }
    for key, path in optional.items():
        for root in (torch, b, b.cuda):
            try:
                obj = root
                for part in path.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                continue
            getters[key] = obj if callable(obj) else (lambda obj=obj: obj)
            break
    state = {key: read(get) for key, get in getters.items()}
    state["rng"] = torch.random.get_rng_state().numpy().tobytes()
    state["numpy_rng"] = repr(np.random.get_state())
    return state


def assert_same_state(before: dict, after: dict) -> None:
    changed = {k: (before[k], after.get(k)) for k in before if before[k] != after.get(k)}
    assert not changed, f"process-wide torch state changed: {changed}"


def float_batch(n: int = 2, size: int = 48) -> torch.Tensor:
    """Generations as a trainer holds them: float NCHW in [0, 1], requiring grad; from a generator of its own."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g).requires_grad_(True)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_loading_and_scoring_with_the_torch_backend_change_no_global_torch_state(tiny_artifacts, mode):
    x = float_batch()
    kept = x.detach().clone()
    before = torch_state()
    scorer = load_quietly(tiny_artifacts, backend="torch")
    try:
        assert_same_state(before, torch_state())  # loading (the random-init weights come from a forked RNG)
        scores = scorer.score_tensors(["a cat", "a dog"], x, mode)
        pixels = float_batch(size=224)  # the tower's own input, requiring grad too
        images = scorer.backend.embed_images(pixels)
        text = scorer.backend.embed_text(scorer.tokenizer(["a cat"]).input_ids)
    finally:
        scorer.close()
    assert_same_state(before, torch_state())
    assert type(scores) is np.ndarray and scores.shape == (2,) and np.isfinite(scores).all()
    assert type(images) is np.ndarray and type(text) is np.ndarray  # numpy out: no autograd graph attached
    assert x.grad is None and x.requires_grad and x.grad_fn is None  # the trainer's tensor, untouched
    assert pixels.grad is None and pixels.grad_fn is None
    assert torch.equal(x.detach(), kept)


def test_the_checker_sees_a_change():
    before = torch_state()
    torch.manual_seed(1234)
    torch.rand(1)
    after = torch_state()
    assert before["rng"] != after["rng"]  # the RNG, compared by value
    torch.random.set_rng_state(torch.ByteTensor(np.frombuffer(before["rng"], dtype=np.uint8).copy()))
    with torch.no_grad():
        assert torch_state()["grad_enabled"] is False
    dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        with pytest.raises(AssertionError, match="default_dtype"):
            assert_same_state(before, torch_state())
    finally:
        torch.set_default_dtype(dtype)
    assert_same_state(before, torch_state())


@pytest.fixture
def restored_threads():
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


def other_thread_count(threads: int) -> int:
    return 1 if threads != 1 else 2


def test_torch_cuda_never_sets_torch_threads(tiny_source, monkeypatch, restored_threads):
    from pickscore_export.source import load_clip

    clip = load_clip(tiny_source)
    monkeypatch.setattr(clip, "to", lambda *args, **kwargs: clip)  # no GPU here: the model stays on the CPU
    before = torch_state()
    TorchBackend(clip, "torch-cuda", "fp16", batch_size=2, threads=other_thread_count(restored_threads))
    assert torch.get_num_threads() == restored_threads
    assert_same_state(before, torch_state())


def test_the_cpu_torch_backend_sets_threads_only_when_asked(tiny_artifacts, restored_threads):
    """Process-wide, as documented: asked for by name, it changes every torch computation's threads."""
    scorer = load_quietly(tiny_artifacts, backend="torch")
    scorer.close()
    assert torch.get_num_threads() == restored_threads  # default: left alone
    wanted = other_thread_count(restored_threads)
    scorer = load_quietly(tiny_artifacts, backend="torch", threads=wanted)
    scorer.close()
    assert torch.get_num_threads() == wanted


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torch_cuda_calls_give_every_setting_back(tiny_source, monkeypatch, precision):
    """fp32 on the GPU turns TF32 off inside each call (torch_towers.EXACT_FP32): run here with the model and its
    inputs on the CPU, the flags it sets and gives back are the GPU's, every one of them read."""
    from pickscore_export.source import load_clip

    clip = load_clip(tiny_source)
    monkeypatch.setattr(clip, "to", lambda *args, **kwargs: clip)
    before = torch_state()
    backend = TorchBackend(clip, "torch-cuda", precision, batch_size=2)
    backend.device, backend._input_dtype = "cpu", torch.float32  # its inputs stay here too
    out = backend.embed_images(float_batch(size=224))
    assert type(out) is np.ndarray
    assert_same_state(before, torch_state())
