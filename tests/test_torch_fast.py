"""The torch backends' numerics and fast path: fp32 on a GPU as the reference computes it without
changing the caller's process-global flags (issue 21, defect 10), torch.compile (tested here on the CPU,
where inductor runs too), and fixed batch buckets for CUDA graphs (their bucketing on the CPU, their
capture on a GPU).

No GPU here: a torch-cuda backend or a GPU reference is built with the model's `.to()` a no-op, so its
flag handling runs on the CPU. Tests marked `gpu` need a CUDA build of torch and a GPU, and skip
elsewhere; they have not run on a GPU yet."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from helpers import load_quietly
from pickscore_runtime.artifacts import Artifacts
from pickscore_runtime.backends import BACKENDS, create_backend
from pickscore_runtime.backends.registry import check_backend_options
from pickscore_runtime.backends.torch_backend import TorchBackend
from pickscore_runtime.errors import PickScoreError
from pickscore_runtime.buckets import batch_buckets, bucket_for, row_chunks
from pickscore_runtime.torch_towers import (EXACT_FP32, BucketedTower, CompiledTower, Fp32Flags, eager_runner, numerics,
                                            pad_rows, tower_module)

EXACT_SDPA = (False, False, False, True)  # flash, mem-efficient, cuDNN off; math on
NO_GPU = BACKENDS["torch-cuda"].unavailable()
needs_torch_cuda = pytest.mark.skipif(NO_GPU is not None, reason=f"torch-cuda: {NO_GPU}")


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 224, 224)).astype(np.float32)


def token_ids(n: int, length: int, seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, 49406, (n, length))
    ids[:, 0], ids[:, -1] = 49406, 49407  # <|startoftext|> ... <|endoftext|>
    return ids


# ---- the caller's TF32 settings (defect 10) ------------------------------------------------------
def legacy_tf32_on():  # what most training scripts write
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def legacy_medium_cudnn_off():
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = False


def new_api_tf32():  # torch >= 2.9's own advice; its legacy getters then raise
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"


def new_api_generic_tf32():
    torch.backends.fp32_precision = "tf32"


CALLER_SETTINGS = {"torch defaults": lambda: None, "legacy TF32 on": legacy_tf32_on,
                   "legacy medium, cuDNN TF32 off": legacy_medium_cudnn_off, "new API TF32": new_api_tf32,
                   "new API generic TF32": new_api_generic_tf32}


@pytest.fixture
def caller_flags():
    """Whatever a test sets, the next test starts from what this one found."""
    found = Fp32Flags.current()
    yield
    if found.precisions:
        torch.backends.fp32_precision = dict(found.precisions)["generic"]  # a parent: Fp32Flags only reads those
    found.restore()
    assert Fp32Flags.current() == found


@pytest.fixture
def clip(tiny_source):
    """A fresh tiny CLIPModel (the tests below change it: its `.to()`, its dtype)."""
    from pickscore_export.source import load_clip

    return load_clip(tiny_source)


def without_a_gpu(clip, monkeypatch):
    """`clip` whose `.to("cuda", ...)` leaves it where it is: a torch-cuda backend or a GPU reference
    built from it runs its flag handling on the CPU."""
    monkeypatch.setattr(clip, "to", lambda *args, **kwargs: clip)
    return clip


def assert_exact(flags: Fp32Flags, caller: Fp32Flags) -> None:
    resolved = dict(flags.precisions)
    if resolved:
        assert (resolved["cuda.matmul"], resolved["cuda.conv"]) == ("ieee", "ieee")
    if caller.matmul_precision is not None:  # the legacy view agrees where the caller's did
        assert flags.matmul_precision == "highest"
    if caller.cudnn_tf32 is not None:
        assert flags.cudnn_tf32 is False
    assert flags.sdpa == EXACT_SDPA


@pytest.mark.parametrize("setting", CALLER_SETTINGS)
def test_exact_fp32_turns_tf32_off_inside_and_gives_back_every_caller_setting(caller_flags, setting):
    CALLER_SETTINGS[setting]()
    caller = Fp32Flags.current()
    with EXACT_FP32:
        assert_exact(Fp32Flags.current(), caller)
        assert torch.backends.cuda.matmul.allow_tf32 is False  # readable, whatever the caller mixed: dynamo reads it
        with EXACT_FP32:  # re-entered by a nested call: still exact, restored once
            assert_exact(Fp32Flags.current(), caller)
        assert_exact(Fp32Flags.current(), caller)
    assert Fp32Flags.current() == caller


def test_overlapping_exact_scopes_in_threads_restore_when_the_last_one_leaves(caller_flags):
    legacy_tf32_on()
    caller = Fp32Flags.current()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with EXACT_FP32:
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with EXACT_FP32:
            second_in.set()
            first_out.wait(10)
            seen["after the first left"] = Fp32Flags.current()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert_exact(seen["after the first left"], caller)
    assert Fp32Flags.current() == caller


def test_only_fp32_on_a_gpu_runs_in_the_exact_scope():
    assert numerics("cuda", "fp32") is EXACT_FP32 and numerics("cuda:1", "fp32") is EXACT_FP32
    assert all(numerics(d, p) is not EXACT_FP32 for d, p in [("cuda", "fp16"), ("cuda", "bf16"), ("cpu", "fp32")])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_cuda_fp16_and_bf16_leave_the_callers_tf32_flags_alone(caller_flags, clip, monkeypatch, precision):
    legacy_tf32_on()
    caller = Fp32Flags.current()
    TorchBackend(without_a_gpu(clip, monkeypatch), "torch-cuda", precision, batch_size=2)
    assert Fp32Flags.current() == caller


def test_torch_cuda_fp32_is_exact_inside_its_calls_and_gives_tf32_back(caller_flags, clip, monkeypatch):
    legacy_tf32_on()
    caller = Fp32Flags.current()
    backend = TorchBackend(without_a_gpu(clip, monkeypatch), "torch-cuda", "fp32", batch_size=2)
    assert Fp32Flags.current() == caller  # building it changes nothing
    backend.device = "cpu"  # its inputs stay here too
    seen = []
    for tower in (clip.vision_model, clip.text_model):
        tower.register_forward_pre_hook(lambda module, args: seen.append(Fp32Flags.current()))
    backend.embed_images(pixels(2))
    backend.embed_text(token_ids(2, 5))
    assert len(seen) == 2
    for flags in seen:
        assert_exact(flags, caller)
    assert Fp32Flags.current() == caller


def test_the_gpu_reference_is_exact_inside_its_calls_only(caller_flags, clip, monkeypatch, tiny_source, sample_images):
    from pickscore_export.reference import Reference

    legacy_tf32_on()
    caller = Fp32Flags.current()
    ref = Reference(tiny_source, model=without_a_gpu(clip, monkeypatch), device="cuda")
    assert Fp32Flags.current() == caller
    ref.device = "cpu"
    seen = []
    clip.vision_model.register_forward_pre_hook(lambda module, args: seen.append(Fp32Flags.current()))
    ref.image_embeddings(sample_images[:2])
    assert len(seen) == 1
    assert_exact(seen[0], caller)
    assert Fp32Flags.current() == caller


# ---- batch buckets (CUDA graphs' fixed shapes) ---------------------------------------------------
def test_buckets_are_powers_of_two_up_to_the_batch_size():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert [bucket_for(n, batch_buckets(48)) for n in (1, 3, 5, 32, 33, 48, 100)] == [1, 4, 8, 32, 48, 48, 48]
    assert row_chunks(11, 8) == [slice(0, 8), slice(8, 11)] and row_chunks(8, 8) == [slice(0, 8)]
    padded = pad_rows(torch.ones(3, 2), 4)
    assert padded.shape == (4, 2) and padded[3].abs().sum() == 0 and padded[:3].eq(1).all()
    with pytest.raises(ValueError):
        batch_buckets(0)


def static_output_runner(tower, static_input):
    """Like a CUDA graph: every run writes one static output."""
    static_output = tower(static_input).clone()

    def run():
        static_output.copy_(tower(static_input))
        return static_output

    return run


@pytest.mark.parametrize("prepare", [eager_runner, static_output_runner])
def test_bucket_padding_gives_the_unpadded_results(clip, prepare):
    tower = tower_module(clip, "vision")
    bucketed = BucketedTower(tower, batch_buckets(8), prepare)
    with torch.inference_mode():
        # 7 then 5: both in bucket 8, the rows 5-7 still hold the 7-batch's pixels
        for n in (1, 3, 5, 7, 5, 11):
            x = torch.from_numpy(pixels(n, seed=n))
            torch.testing.assert_close(bucketed(x), tower(x), rtol=0, atol=1e-6)
        a, b = torch.from_numpy(pixels(3, seed=1)), torch.from_numpy(pixels(3, seed=2))
        first = bucketed(a)
        bucketed(b)  # the same bucket: its static output is overwritten, the first result is not
        torch.testing.assert_close(first, tower(a), rtol=0, atol=1e-6)
    assert sorted(bucketed.runners) == [1, 4, 8]


# ---- torch.compile on the CPU -------------------------------------------------------------------
def compile_state() -> dict:
    return {"dynamo": torch._dynamo.config.get_config_copy(), "inductor": torch._inductor.config.get_config_copy(),
            "fp32": Fp32Flags.current(), "threads": torch.get_num_threads(), "grad": torch.is_grad_enabled()}


@pytest.fixture(scope="module")
def artifacts(tiny_artifacts) -> Artifacts:
    return Artifacts.load(tiny_artifacts, hash_check="size")


@pytest.fixture(scope="module")
def compiled(artifacts):
    """The compiled fp32 `torch` backend, warmed up (both towers compiled), and the global state found
    before it was made."""
    before = compile_state()
    backend = create_backend(artifacts, "torch", "fp32", batch_size=8, compile=True)
    backend.embed_images(pixels(2))
    backend.embed_text(token_ids(2, 7))
    yield backend, before
    backend.close()


@pytest.fixture(scope="module")
def eager(artifacts):
    with create_backend(artifacts, "torch", "fp32", batch_size=8) as backend:
        yield backend


def test_compile_and_cuda_graphs_are_declared_backend_options():
    check_backend_options("torch", {"compile": True})
    check_backend_options("torch-cuda", {"compile": True, "cuda_graphs": True})
    with pytest.raises(PickScoreError, match="takes no option 'cuda_graphs'"):
        check_backend_options("torch", {"cuda_graphs": True})
    with pytest.raises(PickScoreError, match="takes bool"):
        check_backend_options("torch-cuda", {"compile": "yes"})
    with pytest.raises(ValueError, match="cuda_graphs needs the GPU"):
        TorchBackend(object(), "torch", cuda_graphs=True)


def test_compiled_towers_equal_eager_for_every_batch_size_without_recompiling(compiled, eager):
    backend, _ = compiled
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for n in (1, 3, 5, 8, 11):
        np.testing.assert_allclose(backend.embed_images(pixels(n, seed=n)), eager.embed_images(pixels(n, seed=n)),
                                   rtol=0, atol=1e-5)
    for n, length in ((1, 5), (3, 9), (2, 77)):
        ids = token_ids(n, length, seed=n)
        np.testing.assert_allclose(backend.embed_text(ids), eager.embed_text(ids), rtol=0, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # one graph per tower, made in warm-up


def test_compiled_path_takes_tensors_with_gradients_and_changes_no_global_state(compiled, eager):
    backend, before = compiled
    x = torch.from_numpy(pixels(3)).requires_grad_()  # an RL loop's generations
    got = backend.embed_images(x)
    np.testing.assert_allclose(got, eager.embed_images(pixels(3)), rtol=0, atol=1e-5)
    with torch.inference_mode():
        inference_tensor = torch.from_numpy(pixels(3)).clone()
    np.testing.assert_allclose(backend.embed_images(inference_tensor), got, rtol=0, atol=1e-6)
    assert x.grad is None and not hasattr(x, "_dynamo_dynamic_indices")  # the caller's tensor is not marked
    assert compile_state() == before


def test_the_compiled_torch_backend_passes_gate_v3_against_the_reference(tiny_artifacts, monkeypatch):
    from pickscore_export import verify as verify_module

    calls, real_call = [], CompiledTower.__call__
    monkeypatch.setattr(CompiledTower, "__call__", lambda self, x: calls.append(len(x)) or real_call(self, x))
    report = verify_module.verify(tiny_artifacts, backend="torch", precision="fp32", backend_options={"compile": True})
    assert report["passed"], report["failures"]
    assert (report["backend"], report["precision"], report["gate_version"]) == ("torch", "fp32", 3)
    assert report["backend_options"] == {"compile": True}
    assert calls  # the towers that were gated are the compiled ones


# ---- on a GPU (not run on one yet) ---------------------------------------------------------------
@pytest.mark.gpu
@needs_torch_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_cuda_graphs_and_compile_equal_eager_for_every_batch_size_and_in_flight(artifacts, precision):
    """Buckets 1, 4, 8 captured lazily; 11 rows go through in chunks; two batches in flight in one
    bucket each keep their own result. Not run on a GPU yet."""
    tolerance = {"fp16": 2e-3, "bf16": 1.6e-2}[precision]  # run-to-run reorderings of one rounding (test_gpu.py)
    plain = create_backend(artifacts, "torch-cuda", precision, batch_size=8)
    fast = [create_backend(artifacts, "torch-cuda", precision, batch_size=8, **options)
            for options in ({"cuda_graphs": True}, {"compile": True}, {"compile": True, "cuda_graphs": True})]
    for backend in fast:
        for n in (1, 3, 5, 11):
            x = torch.from_numpy(pixels(n, seed=n)).cuda()
            np.testing.assert_allclose(backend.embed_images(x), plain.embed_images(x), rtol=0, atol=tolerance)
        a, b = pixels(5, seed=1), pixels(5, seed=2)
        first, second = backend.submit_images(a), backend.submit_images(b)
        np.testing.assert_allclose(first.result(), plain.embed_images(a), rtol=0, atol=tolerance)
        np.testing.assert_allclose(second.result(), plain.embed_images(b), rtol=0, atol=tolerance)
        backend.close()
    plain.close()


@pytest.mark.gpu
@needs_torch_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_gpu_attention_kernels_are_flash_in_fp16_and_bf16_and_math_in_fp32(artifacts, precision):
    """Which SDPA kernel each precision gets, read off the profiler's kernel names. Not run on a GPU yet."""
    from torch.profiler import ProfilerActivity, profile

    backend = create_backend(artifacts, "torch-cuda", precision, batch_size=8)
    backend.embed_images(pixels(4))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        backend.embed_images(pixels(4))
        backend.embed_text(token_ids(4, 9))
    kernels = " ".join(event.key for event in prof.key_averages()).lower()
    fused = "flash" in kernels or "fmha" in kernels or "efficient_attention" in kernels
    assert ("flash" in kernels) if precision != "fp32" else not fused, kernels[:2000]
    backend.close()


@pytest.mark.gpu
@needs_torch_cuda
def test_gpu_fp32_equals_the_cpu_and_gives_the_callers_tf32_back(tiny_artifacts, caller_flags):
    """Not run on a GPU yet."""
    legacy_tf32_on()
    caller = Fp32Flags.current()
    gpu = load_quietly(tiny_artifacts, backend="torch-cuda", precision="fp32", compile=True)
    cpu = load_quietly(tiny_artifacts, backend="torch", precision="fp32")
    np.testing.assert_allclose(gpu.backend.embed_images(pixels(3)), cpu.backend.embed_images(pixels(3)),
                               rtol=0, atol=1e-5)
    assert Fp32Flags.current() == caller
    gpu.close()
    cpu.close()


@pytest.mark.gpu
@needs_torch_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_compiled_graphed_torch_cuda_passes_gate_v3_against_the_gpu_reference(tiny_artifacts, precision):
    """Not run on a GPU yet."""
    from pickscore_export import verify as verify_module

    report = verify_module.verify(tiny_artifacts, backend="torch-cuda", precision=precision, reference_device="cuda",
                                  backend_options={"compile": True, "cuda_graphs": True})
    assert report["passed"], report["failures"]
