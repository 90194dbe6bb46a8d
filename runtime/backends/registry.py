"""Every backend, declared once as data: where its code lives (imported only when chosen), its device,
default batch, which precisions it runs and in what order it prefers them, what it is built from, the
pip extra it needs, a cheap probe of whether it can run here, and the options its create() takes.
`auto`, the CLI's choices, `ScorerOptions`, `bench` and `verify` all read this table."""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable

from ..artifacts import Artifacts
from ..errors import BackendUnavailableError, PickScoreError
from ..gate_records import GateWarning, gate_status
from ..machine import simd_flags
from ..optional import findable
from ..precisions import EXACT, NAMES
from .base import Backend

log = logging.getLogger("pickscore")


def _missing(*modules: str) -> str | None:
    """modules: import names, or (import name, what to call it) pairs."""
    pairs = [(m, m) if isinstance(m, str) else m for m in modules]
    absent = [name for module, name in pairs if not findable(module)]
    return f"{', '.join(absent)} not installed" if absent else None


def no_nvidia_gpu() -> str | None:
    """Without importing any CUDA library: is there an NVIDIA driver with a device?"""
    if os.path.exists("/proc/driver/nvidia/gpus") and os.listdir("/proc/driver/nvidia/gpus"):
        return None
    if any(os.path.exists(f"/dev/nvidia{i}") for i in range(16)):
        return None
    return "no NVIDIA GPU found"


def _probe_onnx_cpu() -> str | None:
    # onnxruntime (the [cpu] extra) or onnxruntime-gpu ([gpu]) provide the module; both run on the CPU
    return "onnxruntime not installed (pip extra [cpu] or [gpu])" if _missing("onnxruntime") else None


def _probe_onnx_cuda() -> str | None:
    if _missing("onnxruntime"):
        return "onnxruntime-gpu not installed"  # runnable_backend adds its extra, [gpu]
    from .onnxruntime import cuda_provider_missing

    return cuda_provider_missing() or no_nvidia_gpu()  # onnxruntime-gpu lists its provider without a GPU


def _probe_tensorrt() -> str | None:
    # cuda.bindings, not cuda: any cuda.* namespace package (cuda-pathfinder, cuda-core, cuda-python 12.6.0,
    # which has no bindings) provides `cuda`
    return no_nvidia_gpu() or _missing("tensorrt", ("cuda.bindings", "cuda-python>=12.6.1 (cuda.bindings)"))


def _probe_openvino() -> str | None:
    return _missing("openvino")


def _auto_skips_openvino() -> str | None:
    if not set(simd_flags()) & {"avx512_vnni", "amx_int8"}:
        # measured on AVX-512 VNNI only (issue 22); without it onnx-cpu's int8 is the measured path
        return "its int8 was measured faster than onnx-cpu's on CPUs with AVX-512 VNNI only, and this one has none"
    return None


def _probe_torch() -> str | None:
    return _missing("torch", "transformers")


def _probe_torch_cuda() -> str | None:
    reason = no_nvidia_gpu() or _probe_torch()
    if reason is None:
        import torch

        if not torch.cuda.is_available():
            return f"torch {torch.__version__} cannot use the GPU (a CPU-only build, or a driver mismatch)"
    return reason


@dataclass(frozen=True)
class BackendOption:
    """A setting one backend takes beyond the common ones (batch size, threads): declared here, checked by
    `ScorerOptions` before anything opens, passed only to the backends that declare it."""

    name: str
    kind: type | tuple[type, ...]  # isinstance check of the value (None is always allowed: the default)
    about: str

    def check(self, backend: str, value: object) -> None:
        if value is not None and not isinstance(value, self.kind) and not (self.kind is float and isinstance(value, int)):
            kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
            raise PickScoreError(f"backend option {self.name} of {backend} takes {' or '.join(k.__name__ for k in kinds)}, "
                                 f"got {value!r}")


CUDA_GRAPHS = BackendOption("cuda_graphs", bool, "replay CUDA graphs for the vision tower (fixed-shape batches)")
TORCH_OPTIONS = (BackendOption("model_source", object, "where the weights come from (default: the artifacts' own source)"),
                 BackendOption("clip", object, "an already loaded transformers CLIPModel to run"),
                 BackendOption("compile", bool, "run each tower through torch.compile (inductor), one trace for all batch sizes"))


@dataclass(frozen=True)
class BackendInfo:
    name: str
    device: str  # "cpu" | "cuda"
    module: str  # imported only when this backend is opened; has create(artifacts, name, precision, batch_size, ...)
    precisions: tuple[str, ...]  # what it runs; without --precision it takes the first one it can (most accurate / natural first)
    auto_precisions: tuple[str, ...]  # the same, when `auto` chose it (fastest that passes its gate first)
    default_batch: int  # images per vision call
    builds_from: str  # "artifacts": exported ONNX files; "weights": the model the artifacts were exported from
    extra: str  # the pip extra that brings what it needs
    probe: Callable[[], str | None]  # why it cannot run here, or None
    about: str
    options: tuple[BackendOption, ...] = ()  # what its create() takes beyond batch size and threads
    reads: tuple[tuple[str, str], ...] = ()  # (precision, exported precision whose files it runs): bf16 from fp32
    auto_skips: Callable[[], str | None] | None = None  # why auto passes it over on this machine, though it can run

    def unavailable(self) -> str | None:
        return self.probe()

    def derives(self, precision: str) -> bool:
        """Whether it makes `precision` at load from another precision's files (openvino's int8 from fp32): a
        computation of its own, which only its own gate record, made on a CPU like this one, vouches for."""
        return precision in dict(self.reads)

    def files_for(self, precision: str | None) -> str | None:
        """The exported precision whose tower files this backend runs for `precision` (openvino's bf16: fp32)."""
        return dict(self.reads).get(precision, precision)


BACKENDS: dict[str, BackendInfo] = {b.name: b for b in (
    BackendInfo("tensorrt", "cuda", "pickscore_runtime.backends.tensorrt", ("fp16", "fp32"), ("fp16",), 64,
                "artifacts", "tensorrt", _probe_tensorrt, "TensorRT engines built from the ONNX (NVIDIA GPUs)",
                (BackendOption("build", bool, "build a missing engine (minutes); False (--no-build) refuses instead"),
                 BackendOption("engine_flags", object, "engines.profiles.BuildFlags: load or build exactly these"),
                 CUDA_GRAPHS, BackendOption("progress", object, "a callable taking the build's progress lines"))),
    BackendInfo("onnx-cuda", "cuda", "pickscore_runtime.backends.onnxruntime", ("fp16", "fp32"), ("fp16", "fp32"), 64,
                "artifacts", "gpu", _probe_onnx_cuda, "ONNX Runtime, CUDA execution provider",
                (CUDA_GRAPHS, BackendOption("graph_buckets", tuple, "with cuda_graphs: the batch sizes captured"))),
    BackendInfo("torch-cuda", "cuda", "pickscore_runtime.backends.torch_backend", ("fp16", "bf16", "fp32"), ("fp16",), 64,
                "weights", "torch", _probe_torch_cuda, "transformers CLIPModel on the GPU (SDPA), from the weights",
                TORCH_OPTIONS + (CUDA_GRAPHS,)),
    BackendInfo("onnx-cpu", "cpu", "pickscore_runtime.backends.onnxruntime", ("fp32", "int8", "fp16"), ("int8", "fp32", "fp16"), 8,
                "artifacts", "", _probe_onnx_cpu, "ONNX Runtime on the CPU"),
    BackendInfo("torch", "cpu", "pickscore_runtime.backends.torch_backend", ("fp32", "bf16"), ("fp32",), 8,
                "weights", "torch", _probe_torch, "the model card's PyTorch code on the CPU (fp32; bf16 = autocast)",
                TORCH_OPTIONS),
    # auto: int8 only (its bf16 failed the gate and its fp32 is no faster than onnx-cpu's; benchmarks/QUANTIZATION.md),
    # only on CPUs with VNNI, and only where `pickscore verify --backend openvino --precision int8` passed here
    BackendInfo("openvino", "cpu", "pickscore_runtime.backends.openvino", ("fp32", "bf16", "int8"), ("int8",),
                8, "artifacts", "openvino", _probe_openvino,
                "OpenVINO on the CPU, from the fp32 ONNX (int8: int8 weights made at load, activations quantised as it "
                "runs; bf16: a bf16 inference hint)", (), (("bf16", "fp32"), ("int8", "fp32")), _auto_skips_openvino),
)}
AUTO_ORDER = ("tensorrt", "onnx-cuda", "torch-cuda", "openvino", "onnx-cpu")
PRECISIONS = NAMES


def backend_info(name: str) -> BackendInfo:
    try:
        return BACKENDS[name]
    except KeyError:
        close = difflib.get_close_matches(name, BACKENDS, n=1)
        raise BackendUnavailableError(f"unknown backend {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                                      + f"; choose from auto, {', '.join(BACKENDS)}") from None


def resolve_precision(artifacts: Artifacts, info: BackendInfo, precision: str | None, auto: bool = False) -> str:
    """The precision `info` will run: the one asked for (if it can), else its first preference that the
    artifacts carry (backends built from weights run any of theirs). With `auto`, a precision other than
    fp32 only where gate.json says it passed gate v3 on these towers."""
    have = artifacts.precisions if info.builds_from == "artifacts" else list(info.precisions)
    have = have + [p for p, files in info.reads if files in have]
    if precision is not None:
        if precision not in info.precisions:
            raise BackendUnavailableError(f"backend {info.name} runs {', '.join(info.precisions)}, not {precision}")
        if precision not in have:
            raise BackendUnavailableError(
                f"{artifacts.root} has no {precision} towers (has: {', '.join(have)}); "
                f"export them with `pickscore export --precision {precision}`")
        return precision
    refused = []  # the gate's verdicts: the error must say why a precision the artifacts have was passed over
    for p in (info.auto_precisions if auto else info.precisions):
        if p not in have:
            continue
        if not auto or p == EXACT:
            return p
        status = gate_status(artifacts.root, artifacts.fingerprint, info.name, p,
                             derived_on=simd_flags() if info.derives(p) else None,
                             deriving=[b.name for b in BACKENDS.values() if b.derives(p)])
        if status.state == "passed":
            return p
        if status.state == "failed":
            why = f"{p} failed `pickscore verify` on these artifacts ({'; '.join(status.failures) or 'see gate.json'})"
            warnings.warn(f"auto: not {p} on {info.name}: it failed `pickscore verify` on these artifacts "
                          f"({'; '.join(status.failures) or 'see gate.json'}); ask for it with --precision {p}",
                          GateWarning, stacklevel=3)
        else:
            here = f" here ({status.note})" if status.note else ""
            why = f"{p} has not passed the numerics gate on these towers{here}"
            warnings.warn(f"auto: not {p} on {info.name}: it has not passed the numerics gate on these towers{here}; to "
                          f"serve it, run `pickscore verify --artifacts {artifacts.root} --backend {info.name} --precision "
                          f"{p}` once (or ask for it with --precision {p})", GateWarning, stacklevel=3)
        refused.append(why)
    raise BackendUnavailableError(f"backend {info.name} runs {', '.join(info.auto_precisions if auto else info.precisions)}"
                                  f"{' (gated)' if auto else ''}, but {artifacts.root} has only {', '.join(have)}"
                                  + (f"; {'; '.join(refused)} (ask for it with --precision)" if refused else ""))


def runnable_backend(name: str) -> BackendInfo:
    """The named backend, or BackendUnavailableError saying why it cannot run here (a cheap probe: callers
    ask before an export or a load)."""
    info = backend_info(name)
    reason = info.unavailable()
    if reason:
        extra = f" (pip extra [{info.extra}])" if info.extra else ""
        raise BackendUnavailableError(f"backend {name} cannot run here: {reason}{extra}")
    return info


def select_backend(artifacts: Artifacts, name: str = "auto", precision: str | None = None) -> tuple[BackendInfo, str, str]:
    """(backend, precision, why) for a request; `auto` walks AUTO_ORDER and takes the first that can run."""
    if name != "auto":
        info = runnable_backend(name)
        return info, resolve_precision(artifacts, info, precision), f"{name} as asked"
    skipped = []
    for candidate in AUTO_ORDER:
        info = BACKENDS[candidate]
        reason = info.unavailable() or (info.auto_skips and info.auto_skips())
        if reason is None:
            try:
                chosen = resolve_precision(artifacts, info, precision, auto=True)
            except BackendUnavailableError as e:
                reason = str(e)
            else:
                why = "chosen by auto" + (f"; skipped {'; '.join(skipped)}" if skipped else "")
                return info, chosen, why
        skipped.append(f"{candidate}: {reason}")
    raise BackendUnavailableError("no backend can run these artifacts here: " + "; ".join(skipped))


def check_backend_options(backend: str, options: dict[str, object]) -> None:
    """Refuse an option that `backend` does not declare ("auto": that no backend auto may pick declares),
    or a value of the wrong type, naming the options it does take."""
    candidates = [BACKENDS[n] for n in AUTO_ORDER] if backend == "auto" else [backend_info(backend)]
    declared = {o.name: o for info in candidates for o in info.options}
    for name, value in options.items():
        if name not in declared:
            close = difflib.get_close_matches(name, declared, n=1)
            raise PickScoreError(f"backend {backend} takes no option {name!r}"
                                 + (f" (did you mean {close[0]!r}?)" if close else "")
                                 + f"; it takes: {', '.join(sorted(declared)) or 'none'}")
        declared[name].check(backend, value)


def open_backend(info: BackendInfo, artifacts: Artifacts, precision: str, *, batch_size: int | None = None,
                 threads: int | None = None, **options: object) -> Backend:
    """Open a backend chosen by `select_backend`. Of `options`, those it declares go to it (see
    `check_backend_options`: an option no candidate declares is refused before this)."""
    if batch_size is not None and batch_size < 1:
        raise PickScoreError(f"batch size must be at least 1, got {batch_size}")
    declared = {o.name for o in info.options}
    module = importlib.import_module(info.module)
    return module.create(artifacts, info.name, precision, batch_size or info.default_batch, threads=threads,
                         **{k: v for k, v in options.items() if k in declared})


def create_backend(artifacts: Artifacts, name: str = "auto", precision: str | None = None, **options: object) -> Backend:
    """select_backend + open_backend ("auto": the fastest that can run here, logged with the reason)."""
    check_backend_options(name, {k: v for k, v in options.items() if k not in ("batch_size", "threads")})
    info, precision, why = select_backend(artifacts, name, precision)
    log.info("backend %s", why)
    return open_backend(info, artifacts, precision, **options)
