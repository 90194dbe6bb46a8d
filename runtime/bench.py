"""`pickscore bench`: every backend measured side by side in one process, on the same inputs, as
comparable rows {backend, precision, device, stage, batch_size, items_per_s, p50_ms, p95_ms, peak_rss_mb,
gpu_mem_mb, error, options, requested, vs_torch_fp32, vs_torch_bf16, runs, gpu_weights_mb, gpu_workspace_mb,
colocated_items_per_s, workload_alone_iters_per_s, workload_colocated_iters_per_s, colocated_slowdown,
colocated_error}.

Backends are specs `name[:precision[:option=value,...]]` (BenchSpec): `torch:fp32` is the model card's
PyTorch code, `torch:bf16` the same under CPU autocast, `onnx-cpu:int8` the runtime's fast CPU path,
`torch-cuda:fp16:compile=true,cuda_graphs=true` torch-cuda with the backend options it declares (the
registry's BackendOption; checked as ScorerOptions checks them). A row's `options` names them. `auto` is the
backend and precision the registry's select_backend picks for these artifacts on this machine (what `pickscore
score` would serve), resolved once the artifacts are loaded: its rows name that backend and precision, with
`requested` "auto"; it takes no precision (choosing one is its job). Each backend is
timed with its own clock, which waits for the device before reading the time (timm's
`cuda_timestamp` idea), so GPU numbers are not launch times. gpu_mem_mb is the device memory in use
(every process's, as cudaMemGetInfo reports it) at its peak while the row was timed, for rows of cuda
backends: like peak_rss_mb, interleaved rows share one figure for all the backends held at once.

A cell that raises (out of memory at a large batch, a batch size the artifacts refuse, a backend that
cannot open) becomes a row with `error` set to the exception's text and no figures, and the other cells
are measured (timm benchmark.py's `_try_run` idea, without its retry at a smaller batch: a failed batch
size is a result). With `output`, the JSON is rewritten after every timed block, so it holds every row
measured so far even if the process is killed; `complete` says whether the run got to its end. The JSON
records the code (`code`: commit or package version), the command line, the working directory and the
machine (pickscore_runtime.machine: its SIMD flags decide int8 and bf16 speed, so the markdown names them too).

Every CPU row carries its items/s against the model card's PyTorch code, plain (`vs_torch_fp32`) and under
bf16 autocast (`vs_torch_bf16`): what a CPU user would run first. The reference is the torch row (no options)
of the same stage and batch size in the same run; without one the ratio is None. Interleaved (the default),
those rows were timed in the same rounds, so the ratio holds on a machine whose speed drifts; with
`interleave=False` they were not. benchmarks/ratios.py reads the same ratios (torch_reference).

The vision stage keeps its batches in flight (`inflight.embed_in_flight`, the backend's `submit_images`):
on a backend that overlaps them (queue_depth > 1: the GPU backends) each timed call submits VISION_BATCHES
batches, so the copy of one batch overlaps the compute of the one before, as in the pipeline; elsewhere
one. Its p50/p95 are per batch.

GPU memory, per cuda row: `gpu_weights_mb` is the device memory in use after its backend opened minus
before (its weights, and whatever else opening it put on the device: engines, kernels, handles);
`gpu_workspace_mb` the peak while the cell's calls ran minus the memory in use just before them (backends
open, the batch's input tensors on the device, torch's allocator cache emptied first, so each block's
workspace is its own). Both read the whole device (cudaMemGetInfo), so another process's allocations show;
interleaved, the cells of one batch size share one workspace figure, like gpu_mem_mb. gpu_memory_targets
sets the two against GPU_MEMORY_TARGET_MB, printed beside the table until a GPU run records them.

`colocate=True` (`--colocate`) also measures every cell beside a stand-in for a trainer's step on the same
GPU (colocated.stand_in_trainer, a bf16 matmul loop on its own stream in a background thread): the
stand-in's iterations/s alone and during the cell (`workload_alone_iters_per_s`,
`workload_colocated_iters_per_s`, their ratio `colocated_slowdown`), and the cell's own items/s under that
contention (`colocated_items_per_s`; `items_per_s` stays uncontended). Each cell gets its own contended
window, after its uncontended timing, interleaved or not. A cell that fails only there keeps its figures and
records `colocated_error`. Without an NVIDIA GPU and a CUDA build of torch it is refused before anything
loads (colocated.check_colocate). Never run on a GPU yet.

PRESETS are named scenarios (backends, batch sizes, stages, timing); benchmarks/gpu/acceptance.py runs
parts of `gpu` that fit its time budget.
"""

from __future__ import annotations

import gc
import json
import os
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from . import colocated
from .argtypes import option_pair
from .artifacts import Artifacts
from .backends import BACKENDS, Backend, create_backend, select_backend
from .backends.base import effective_precision
from .errors import PickScoreError
from .inflight import embed_in_flight
from .machine import code_version, gpu_info, machine_info
from .options import ScorerOptions
from .optional import findable, require
from .pipeline import default_workers
from .scorer import PickScorer

AUTO = "auto"  # a spec naming no backend: what the registry's select_backend picks here
STAGES = ("vision", "text", "text-cached", "e2e", "e2e-png", "tensors-exact", "tensors-fast")
DEFAULT_STAGES = STAGES[:5]  # the tensors stages are asked for by name (RL reward loops, the GPU acceptance)
VISION_BATCHES = 4  # batches per timed vision call on a backend that keeps more than one in flight
TENSOR_SIZE = 512  # tensors stages: uint8 RGB generations of this size, as an RL loop holds them
GPU_MEMORY_TARGET_MB = 3 * 1024  # the reward's device memory (vision fp16 + text: weights + workspace) ...
GPU_MEMORY_TARGET_BATCH = 64  # ... at this batch size; a target until a GPU run records the figures
BENCH_PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "a cozy cabin in the snowy mountains at dusk, warm light in the windows, highly detailed",
    "oil painting of a cat in the style of van gogh",
    "minimalist logo, red circle on a white background",
]


@dataclass(frozen=True)
class BenchSpec:
    """One backend as the bench opens it: its registry name, precision (None: the backend's first) and the
    backend options it is opened with, as (name, value) pairs in the order given."""

    name: str
    precision: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    requested: str | None = None  # what was asked for when it was resolved to this spec ("auto"); None: this spec

    @property
    def options_text(self) -> str:
        """The options as the spec writes them ("compile=true,cuda_graphs=true"; "" for none)."""
        return ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.options)

    def __str__(self) -> str:
        """The spec as parse_backend_specs reads it back."""
        parts = [self.name] + ([self.precision or ""] if self.precision or self.options else [])
        return ":".join(parts + ([self.options_text] if self.options else []))

    def checked(self) -> "BenchSpec":
        """This spec, or PickScoreError naming what is wrong (an unknown backend, a precision it does not run,
        an option it does not declare or a value of the wrong type), before anything opens."""
        if self.name == AUTO and self.precision is not None:
            raise PickScoreError(f"bench backend auto:{self.precision}: auto picks the precision as well as the backend, "
                                 f"and its rows name both; write `auto` alone, or name a backend to fix the precision "
                                 f"(e.g. onnx-cpu:{self.precision})")
        ScorerOptions(backend=self.name, precision=self.precision, backend_options=dict(self.options))
        return self


def resolved_spec(artifacts: Artifacts, spec: BenchSpec) -> BenchSpec:
    """The spec the bench opens: `spec` itself, or for `auto` the backend and precision select_backend picks
    for these artifacts here (gate records included), with requested="auto" and those of its options that
    backend declares (open_backend passes no others). PickScoreError (auto:PRECISION) or
    BackendUnavailableError (nothing can run) where it cannot."""
    if spec.name != AUTO:
        return spec
    spec.checked()
    info, precision, _ = select_backend(artifacts, AUTO)
    declared = {option.name for option in info.options}
    return BenchSpec(info.name, precision, tuple((k, v) for k, v in spec.options if k in declared), requested=AUTO)


def parse_backend_specs(text: str) -> list[BenchSpec]:
    """Comma-separated `name[:precision[:option=value,...]]`, e.g. `onnx-cpu:int8,torch-cuda:fp16:compile=true,
    cuda_graphs=true`: an item `option=value` with no colon before its `=` is one more option of the spec
    before it. Each spec is checked (BenchSpec.checked); PickScoreError names the first wrong one."""
    return [spec.checked() for spec in split_backend_specs(text)]


def split_backend_specs(text: str) -> list[BenchSpec]:
    """parse_backend_specs without the checks (the presets, written before every backend's options load)."""
    specs: list[tuple[str, str | None, list[tuple[str, Any]]]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item.split("=", 1)[0]:
            if not specs:
                raise PickScoreError(f"backend option {item!r} comes before any backend (name[:precision[:option=value,...]])")
            specs[-1][2].append(spec_option(item))
            continue
        name, _, rest = item.partition(":")
        precision, _, options = rest.partition(":")
        specs.append((name, precision or None, [spec_option(options)] if options else []))
    return [BenchSpec(name, precision, tuple(options)) for name, precision, options in specs]


def spec_option(text: str) -> tuple[str, Any]:
    try:
        return option_pair(text)
    except ValueError as e:
        raise PickScoreError(str(e)) from None


def bench_spec(spec: "BenchSpec | str | Sequence[Any]") -> BenchSpec:
    """A spec from what callers pass: a BenchSpec, its text, or a (name, precision[, options]) tuple."""
    if isinstance(spec, BenchSpec):
        return spec
    if isinstance(spec, str):
        (one,) = split_backend_specs(spec)
        return one
    name, precision, *rest = spec
    options = rest[0] if rest else {}
    return BenchSpec(name, precision, tuple(dict(options).items()))


def specs(*texts: str) -> tuple[BenchSpec, ...]:
    return tuple(bench_spec(t) for t in texts)


@dataclass(frozen=True)
class Preset:
    """A named scenario for `pickscore bench --preset NAME` (flags given beside it replacing its values)."""

    about: str
    backends: tuple[BenchSpec, ...]
    batch_sizes: tuple[int, ...]
    stages: tuple[str, ...]
    min_calls: int = 3
    min_seconds: float = 2.0
    e2e_images: int | None = None  # None: twice the largest batch


PRESETS: dict[str, Preset] = {
    "cpu": Preset("the shipped CPU paths and what auto serves here against the model card's PyTorch code (fp32 and "
                  "bf16 autocast), vision and text towers: RESULTS.md's comparison",
                  specs("torch:fp32", "torch:bf16", "onnx-cpu:fp32", "onnx-cpu:int8", "openvino:int8", AUTO), (1, 4),
                  ("vision", "text"),
                  min_calls=2, min_seconds=1.0),
    "cpu-e2e": Preset("files on disk to scores on the CPU: vision tower alone against the end-to-end JPEG and PNG "
                      "pipeline (decoding threads: --workers)",
                      specs("onnx-cpu:int8", "onnx-cpu:fp32"), (4,), ("vision", "e2e", "e2e-png"), e2e_images=8),
    "cpu-rl": Preset("an RL reward loop on the CPU: generations already in memory (uint8 tensors, exact and fast "
                     "resize) scored against prompts already in the text cache",
                     specs("onnx-cpu:int8", "onnx-cpu:fp32"), (1, 4, 8), ("tensors-exact", "tensors-fast", "text-cached"),
                     min_calls=2, min_seconds=1.0),
    "gpu": Preset("every GPU backend against torch-cuda: eager fp16 / bf16 / fp32 (the model card code), compiled "
                  "fp16 (torch.compile, and with CUDA graphs), batch 1-256; benchmarks/gpu/acceptance.py runs the "
                  "parts that fit its time budget and drops the backends a machine cannot run",
                  specs("tensorrt:fp16", "onnx-cuda:fp16", "torch-cuda:fp16", "torch-cuda:bf16",
                        "torch-cuda:fp16:compile=true", "torch-cuda:fp16:compile=true,cuda_graphs=true", "torch-cuda:fp32"),
                  (1, 16, 64, 128, 256), ("vision", "text", "e2e", "e2e-png", "tensors-exact", "tensors-fast"),
                  min_calls=3, min_seconds=0.5, e2e_images=256),
    "gpu-rl": Preset("an RL reward loop on a GPU: generations as device tensors scored against cached prompts",
                     specs("tensorrt:fp16", "onnx-cuda:fp16", "torch-cuda:fp16"), (16, 64, 256),
                     ("tensors-exact", "tensors-fast", "text-cached"), min_calls=3, min_seconds=0.5),
}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise PickScoreError(f"unknown bench preset {name!r}; known: {', '.join(PRESETS)}") from None


@dataclass
class Row:
    backend: str
    precision: str
    device: str
    stage: str
    batch_size: int
    items_per_s: float | None  # None: the cell failed (error)
    p50_ms: float | None
    p95_ms: float | None
    peak_rss_mb: float | None
    gpu_mem_mb: float | None = None  # cuda backends only
    error: str | None = None  # what the cell raised: "ExceptionType: message"
    options: str = ""  # the backend options it ran with, as the spec wrote them ("compile=true,cuda_graphs=true")
    requested: str | None = None  # "auto" when auto picked this backend and precision; None: named in --backends
    vs_torch_fp32: float | None = None  # items_per_s over the torch fp32 row's (with_torch_ratios); CPU rows only
    vs_torch_bf16: float | None = None  # the same against torch bf16 autocast
    runs: str | None = None  # what the kernels really ran, where it differs from `precision` (base.effective_precision)
    gpu_weights_mb: float | None = None  # cuda rows: device memory in use after the backend opened minus before
    gpu_workspace_mb: float | None = None  # cuda rows: peak during the cell's calls minus just before them
    colocated_items_per_s: float | None = None  # colocate: the cell's items/s beside the stand-in trainer
    workload_alone_iters_per_s: float | None = None  # colocate: the stand-in's iterations/s alone, just before
    workload_colocated_iters_per_s: float | None = None  # colocate: its iterations/s while the cell ran
    colocated_slowdown: float | None = None  # colocate: alone / colocated (1.0: the trainer untouched)
    colocated_error: str | None = None  # colocate: what the contended part raised (the uncontended figures stand)


# The ratio fields of a row and the torch precision each compares against.
TORCH_REFERENCES = {"vs_torch_fp32": "fp32", "vs_torch_bf16": "bf16"}


def torch_reference(row: dict, rows: Sequence[dict], precision: str) -> dict | None:
    """The measured row of the model card's PyTorch code on the CPU (backend torch, no options, named rather
    than picked by auto) at `precision`, for the same stage and batch size as `row`; None if there is none."""
    return next((r for r in rows if r["backend"] == "torch" and r["precision"] == precision and not r.get("options")
                 and not r.get("requested") and r["stage"] == row["stage"] and r["batch_size"] == row["batch_size"]
                 and not r.get("error") and r.get("items_per_s")), None)


def with_torch_ratios(rows: Sequence[dict]) -> list[dict]:
    """Copies of `rows` with vs_torch_fp32 / vs_torch_bf16 set on each measured CPU row (its items/s over its
    torch_reference's, to 3 decimals) and None elsewhere: GPU rows, failed cells, no torch row to compare with.
    Rows written before these fields (no `device`: CPU then) are read the same way."""
    out = []
    for row in rows:
        ratios = dict.fromkeys(TORCH_REFERENCES)
        if row.get("device", "cpu") == "cpu" and not row.get("error") and row.get("items_per_s") is not None:
            for key, precision in TORCH_REFERENCES.items():
                reference = torch_reference(row, rows, precision)
                if reference is not None:
                    ratios[key] = round(row["items_per_s"] / reference["items_per_s"], 3)
        out.append({**row, **ratios})
    return out


def row_label(row: dict) -> str:
    """backend/precision, the options when there are any, and "auto: " before it when auto picked it: what a
    table or a chart calls a row's backend."""
    label = f"{row['backend']}/{row['precision']}"
    label = f"{label} ({row['options']})" if row.get("options") else label
    return f"{row['requested']}: {label}" if row.get("requested") else label


def bench_prompts(n: int) -> list[str]:
    return [f"{BENCH_PROMPTS[i % len(BENCH_PROMPTS)]} #{i}" for i in range(n)]


def bench_images(n: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the process's lifetime peak is the best we have
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_memory_probe() -> Callable[[], float] | None:
    """MiB of device memory in use, through cuda-python, else through torch when a torch backend already
    loaded it; None when neither can tell."""
    try:
        from .cuda_memory import memory_in_use_mb

        memory_in_use_mb()
        return memory_in_use_mb
    except Exception:  # noqa: BLE001 - no cuda-python or no driver (a PickScoreError), or cuda-bindings' own
        pass  # RuntimeError ("Failed to dlopen libcuda.so.1") where a version raises instead of returning an error
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return lambda: (lambda free, total: (total - free) / 2**20)(*torch.cuda.mem_get_info())
    return None


class PeakRss:
    """Samples resident memory (and device memory, given a probe) every 50 ms while the block runs."""

    def __init__(self, gpu: Callable[[], float] | None = None):
        self._gpu = gpu
        self.gpu_peak: float | None = None

    def __enter__(self) -> "PeakRss":
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._measure()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _measure(self) -> None:
        self.peak = max(self.peak, _rss_mb())
        if self._gpu is not None:
            try:
                self.gpu_peak = max(self.gpu_peak or 0.0, self._gpu())
            except Exception:  # noqa: BLE001 - a device in an error state (a failed cell): no figure, no crash
                self._gpu = None

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self._measure()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._measure()


def device_clock(backend: Backend) -> Callable[[], float]:
    """Seconds, read after the backend's device has finished what was queued on it."""
    def now() -> float:
        backend.synchronize()
        return time.perf_counter()
    return now


def time_calls(fns: Sequence[Callable[[], object]], min_calls: int, min_seconds: float,
               clocks: Sequence[Callable[[], float]] | None = None,
               errors: list[BaseException | None] | None = None, warm_up: bool = True) -> list[list[float]]:
    """Seconds per call of each fn, after one warm-up call each, timed in round-robin rounds; a fn
    leaves the rounds once it has at least min_calls calls and min_seconds in total. Interleaving
    makes a slow drift in the machine's speed (a busy neighbour, clock changes) hit every fn alike,
    so their ratios stay honest. clocks: one per fn (default: the host's perf_counter).

    errors: without it, the first exception propagates. Given a list, it receives one entry per fn:
    None, or the Exception that fn (or its clock) raised, warming up or timed; that fn leaves the rounds
    with no times (a failed cell, not a shorter measurement) and the others go on. warm_up=False: no
    warm-up call (the caller made one)."""
    clocks = clocks or [time.perf_counter] * len(fns)
    failed: list[BaseException | None] = [None] * len(fns)
    times: list[list[float]] = [[] for _ in fns]

    def call(i: int, timed: bool) -> None:
        try:
            if not timed:
                fns[i]()
                return
            t0 = clocks[i]()
            fns[i]()
            times[i].append(clocks[i]() - t0)
        except Exception as e:  # KeyboardInterrupt and the like still stop the run
            if errors is None:
                raise
            failed[i], times[i] = e, []

    def wants_more(i: int) -> bool:
        return failed[i] is None and (len(times[i]) < min_calls or sum(times[i]) < min_seconds)

    for i in range(len(fns) if warm_up else 0):
        call(i, timed=False)
    while any(wants_more(i) for i in range(len(fns))):
        for i in range(len(fns)):
            if wants_more(i):
                call(i, timed=True)
    if errors is not None:
        errors[:] = failed
    return times


def row_from_times(backend: Backend, stage: str, batch: int, items_per_call: int, times: list[float], peak: float,
                   gpu_peak: float | None = None, options: str = "", requested: str | None = None,
                   gpu_base: float | None = None) -> Row:
    """The row of one measured cell; a vision call's time is shared by its batches, so its p50/p95 are per batch.
    gpu_base: the device memory in use just before the cell's calls (its workspace: gpu_peak minus it)."""
    ms = np.array(times) * 1000 / (items_per_call // batch if stage == "vision" else 1)
    cuda = gpu_peak is not None and backend.device == "cuda"
    runs = effective_precision(backend)
    return Row(backend.name, backend.precision, backend.device, stage, batch, items_rate(items_per_call, times),
               round(float(np.percentile(ms, 50)), 3), round(float(np.percentile(ms, 95)), 3), round(peak),
               round(gpu_peak) if cuda else None, options=options, requested=requested,
               runs=None if runs == backend.precision else runs,
               gpu_workspace_mb=round(gpu_peak - gpu_base) if cuda and gpu_base is not None else None)


def items_rate(items_per_call: int, times: Sequence[float]) -> float:
    return round(items_per_call * len(times) / sum(times), 3)


def read_probe(probe: Callable[[], float] | None) -> float | None:
    """The probe's figure, or None without a probe or where it cannot read (a device in an error state)."""
    try:
        return None if probe is None else probe()
    except Exception:  # noqa: BLE001 - no figure, no crash (as PeakRss)
        return None


def device_memory_added(probe: Callable[[], float] | None, fn: Callable[[], Any]) -> tuple[Any, float | None]:
    """fn()'s result, and the MiB of device memory in use after it minus before (None where the probe cannot
    tell): a backend's weights, for the probe of its device (gpu_probe_for)."""
    before = read_probe(probe)
    result = fn()
    after = read_probe(probe)
    return result, (round(after - before) if before is not None and after is not None else None)


def gpu_probe_for(name: str) -> Callable[[], float] | None:
    """The device memory probe a backend's weights are measured with: None for a CPU backend (or where nothing
    can read the device). torch-cuda brings torch in first (it is about to), so the probe can read through it
    where cuda-python is absent."""
    if name not in BACKENDS or BACKENDS[name].device != "cuda":
        return None
    if name == "torch-cuda" and findable("torch"):
        import torch  # noqa: F401 - gpu_memory_probe reads through an imported torch

    return gpu_memory_probe()


def error_text(e: BaseException) -> str:
    """One line naming what a failed cell raised: its type and message (lines joined, at most 500 characters)."""
    message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{type(e).__name__}: {message[:500]}" if message else type(e).__name__


def error_row(name: str, precision: str | None, device: str, stage: str, batch: int, error: BaseException | str,
              options: str = "", requested: str | None = None) -> Row:
    text = error if isinstance(error, str) else error_text(error)
    return Row(name, precision or "default", device, stage, batch, None, None, None, None, None, text, options, requested)


def open_backend_spec(artifacts: Artifacts, spec: BenchSpec, model_source: Any, threads: int | None,
                      shared_cpu_clip: dict[str, Any]) -> Backend:
    """The backend of one spec, opened with its options; CPU torch backends share one loaded model (autocast
    leaves weights fp32)."""
    name, precision = spec.name, spec.precision
    options: dict[str, Any] = {"threads": threads, **dict(spec.options)}
    if name in ("torch", "torch-cuda"):
        options["model_source"] = model_source
    if name == "torch":
        if "clip" not in shared_cpu_clip:
            from .optional import export_tools

            tools = export_tools("the torch backends", ("torch", "transformers"), "torch")
            shared_cpu_clip["clip"] = tools.load_clip(model_source or tools.source_from_manifest(artifacts.manifest))
        options["clip"] = shared_cpu_clip["clip"]
    return create_backend(artifacts, name, precision, **options)


@dataclass
class BenchInputs:
    pixels: np.ndarray  # preprocessed images, one per batch slot
    input_ids: np.ndarray  # tokenised prompts (padded), one per batch slot
    prompts: list[str]
    jpegs: list[str]  # a generated folder of JPEGs for the end-to-end stage
    pngs: list[str]  # the same images as PNGs (e2e-png)
    tensors: np.ndarray  # uint8 [max_batch, 3, TENSOR_SIZE, TENSOR_SIZE] (tensors-exact, tensors-fast)


def bench_inputs(scorer: PickScorer, max_batch: int, folder: Path, n_jpegs: int,
                 stages: Sequence[str] = STAGES) -> BenchInputs:
    """Deterministic inputs built by the runtime's own tokenizer and preprocessing."""
    prompts = bench_prompts(max_batch)
    images = bench_images(max(max_batch, n_jpegs))
    jpegs, pngs = [], []
    for i, img in enumerate(images[:n_jpegs]):
        if "e2e" in stages:
            jpegs.append(str(folder / f"bench_{i:03d}.jpg"))
            img.save(jpegs[-1], "JPEG", quality=90)
        if "e2e-png" in stages:
            pngs.append(str(folder / f"bench_{i:03d}.png"))
            img.save(pngs[-1], "PNG")
    tensors = np.stack([np.asarray(img.resize((TENSOR_SIZE, TENSOR_SIZE))).transpose(2, 0, 1) for img in images[:max_batch]])
    return BenchInputs(np.stack([scorer.preprocessor(img) for img in images[:max_batch]]),
                       scorer.tokenizer(prompts).input_ids, prompts, jpegs, pngs, tensors)


def stage_call(scorer: PickScorer, stage: str, batch: int, inputs: BenchInputs) -> tuple[Callable[[], object], int]:
    """What one timed call of `stage` does, and how many items it handles."""
    backend = scorer.backend
    if stage == "vision":  # batches in flight: the next one's copy overlaps this one's compute
        batches = [inputs.pixels[:batch]] * (VISION_BATCHES if backend.queue_depth > 1 else 1)
        return (lambda: list(embed_in_flight(backend, batches))), batch * len(batches)
    if stage == "text":
        return (lambda: backend.embed_text(inputs.input_ids[:batch])), batch
    if stage == "text-cached":  # tokenise + cache lookup; the first (warm-up) call fills the cache
        return (lambda: scorer.embed_text(inputs.prompts[:batch])), batch
    if stage in ("e2e", "e2e-png"):  # files on disk -> decode/preprocess pool -> batches -> scores
        files = inputs.jpegs if stage == "e2e" else inputs.pngs
        work = [(inputs.prompts[0], files)]
        return (lambda: list(scorer.score_many(work, batch_size=batch))), len(files)
    if stage.startswith("tensors-"):  # an RL step: a batch of generations already in memory -> rewards
        batch_tensor: Any = inputs.tensors[:batch]
        if backend.device == "cuda":  # where a GPU trainer holds them
            batch_tensor = require("torch", "tensors stages on a GPU").from_numpy(batch_tensor).cuda()
        return (lambda: scorer.score_tensors(inputs.prompts[:batch], batch_tensor, stage.split("-")[1])), batch
    raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")


def release_memory() -> None:
    """After a failed cell (out of memory, typically): give back what the failure left behind before the
    next cell is timed."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def write_json(path: str | Path, data: dict) -> None:
    """Replace `path` whole (write beside it, then rename): a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def time_block(block: Sequence[tuple[PickScorer, str, BenchSpec]], batch: int, inputs: BenchInputs, min_calls: int,
               min_seconds: float, gpu: Callable[[], float] | None,
               workload: colocated.Workload | None = None) -> list[Row]:
    """One row per (scorer, stage, the spec it was opened from) of `block`, timed in the same interleaved rounds; a
    cell that raises (building its call, warming up or timed) becomes an error row and the others are still measured.
    With a gpu probe, torch's allocator cache is emptied first and the memory in use then is the block's
    workspace baseline. With a workload (colocate), each measured cell is then timed again beside it
    (time_colocated)."""
    rows: list[Row | None] = [None] * len(block)
    calls = []  # (position in block, call, items per call)

    def failed(k: int, error: BaseException) -> Row:
        scorer, stage, spec = block[k]
        b = scorer.backend
        return error_row(b.name, b.precision, b.device, stage, batch, error, spec.options_text, spec.requested)

    for k, (scorer, stage, _) in enumerate(block):
        try:
            call, items = stage_call(scorer, stage, batch, inputs)
            calls.append((k, call, items))
        except Exception as e:  # noqa: BLE001 - the cell's error
            rows[k] = failed(k, e)
    errors: list[BaseException | None] = []
    clocks = [device_clock(block[k][0].backend) for k, _, _ in calls]
    if gpu is not None:
        release_memory()  # what earlier blocks left in torch's cache goes back: this block's workspace is its own
    base = read_probe(gpu)
    with PeakRss(gpu) as rss:
        times = time_calls([call for _, call, _ in calls], min_calls, min_seconds, clocks, errors=errors)
    for (k, _, items), t, error in zip(calls, times, errors):
        scorer, stage, spec = block[k]
        rows[k] = (failed(k, error) if error is not None
                   else row_from_times(scorer.backend, stage, batch, items, t, rss.peak, rss.gpu_peak, spec.options_text,
                                       spec.requested, gpu_base=base))
    if workload is not None:
        for (k, call, items), clock in zip(calls, clocks):
            row = rows[k]
            if row is not None and row.error is None:
                time_colocated(row, call, items, clock, workload, min_calls, min_seconds)
    if any(r.error for r in rows if r is not None):
        release_memory()
    return [r for r in rows if r is not None]


def opened(backend: Backend) -> Backend:
    """`backend`, once its device has finished what opening it queued."""
    backend.synchronize()
    return backend


def time_colocated(row: Row, call: Callable[[], object], items: int, clock: Callable[[], float],
                   workload: colocated.Workload, min_calls: int, min_seconds: float) -> None:
    """Fill `row`'s colocated fields: the workload's iterations/s alone (colocated.ALONE_SECONDS, just before),
    then, with it running, one warm-up call of the cell and at least min_calls calls and max(min_seconds,
    ALONE_SECONDS) of timed calls, the workload's iterations counted over exactly those. Whatever raises (the
    cell, or the workload itself) goes to `colocated_error`; the row's uncontended figures stand."""
    try:
        alone = workload.alone(colocated.ALONE_SECONDS)
        errors: list[BaseException | None] = []
        with workload.running():
            call()  # warm-up under contention (the workload's loop is already past its first iteration)
            start = workload.mark()
            (times,) = time_calls([call], min_calls, max(min_seconds, colocated.ALONE_SECONDS), [clock],
                                  errors=errors, warm_up=False)
            end = workload.mark()
        if errors[0] is not None:
            raise errors[0]
    except Exception as e:  # noqa: BLE001 - the colocated part of this cell failed; the others go on
        row.colocated_error = error_text(e)
        release_memory()
        return
    row.workload_alone_iters_per_s = alone
    row.workload_colocated_iters_per_s = colocated.iterations_per_s(start, end)
    row.colocated_slowdown = colocated.slowdown(alone, row.workload_colocated_iters_per_s)
    row.colocated_items_per_s = items_rate(items, times)


def run_bench(artifacts_dir: str | Path, backends: Sequence[BenchSpec | str | tuple], batch_sizes: Sequence[int],
              stages: Sequence[str] = DEFAULT_STAGES, model_source: Any = None, threads: int | None = None,
              workers: int | None = None, min_calls: int = 3,
              min_seconds: float = 2.0, n_jpegs: int | None = None, interleave: bool = True,
              progress: Callable[[str], None] = print, output: str | Path | None = None,
              command: Sequence[str] | None = None, rows: str | Path | None = None, colocate: bool = False) -> dict:
    """interleave=True: every backend is open at once, and for each batch size every (backend, stage)
    is timed in the same rounds, so backend-vs-backend and e2e-vs-vision ratios hold on a machine
    whose speed drifts; peak_rss_mb is then the whole process's. interleave=False: one backend in
    memory at a time, one (stage, batch) after another, so peak_rss_mb is per backend.

    A backend that cannot open gives an error row for each of its cells; a cell that raises gives one
    error row; everything else is measured. output: the JSON, rewritten after every timed block (and
    once more, with `complete` true, at the end; with `stopped_by` if an exception ends the run).
    progress: each row as one line of JSON, once measured. command: the command line to record
    (default sys.argv). rows: a JSON-lines file (started empty) each row is appended to and flushed as it
    is measured; default: `output` with the suffix .jsonl (none without output).
    backends: BenchSpec, its text (`name[:precision[:option=value,...]]`, or `auto`: resolved_spec) or (name,
    precision[, options]). Each row carries vs_torch_fp32 / vs_torch_bf16 (with_torch_ratios).
    colocate: also time every cell beside a stand-in for a trainer's step on the same GPU (the module's
    docstring); refused (PickScoreError) before anything loads where it cannot run. The stand-in is set up
    before any backend opens, so its memory is in every baseline."""
    started = time.time()
    backends = [bench_spec(b) for b in backends]
    workload = None
    if colocate:
        colocated.check_colocate()
        workload = colocated.stand_in_trainer()
    rows_file = Path(rows) if rows is not None else Path(output).with_suffix(".jsonl") if output else None
    if rows_file is not None:
        rows_file.write_text("")
    artifacts = Artifacts.load(artifacts_dir, hash_check="size")
    n_jpegs = n_jpegs or 2 * max(batch_sizes)
    result: dict[str, Any] = {
        "code": code_version(), "command": shlex.join(sys.argv if command is None else command), "cwd": os.getcwd(),
        "started_utc": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(threads), "artifacts": str(artifacts_dir), "random_weights": artifacts.random_weights,
        "interleaved": interleave, "n_jpegs_e2e": n_jpegs, "e2e_workers": workers or default_workers(),
        "colocated_workload": workload.about if workload is not None else None, "complete": False, "rows": []}
    measured: list[tuple[int, Row]] = []  # (index of the backend spec, row): rows sort in --backends order

    def publish(new: list[tuple[int, Row]]) -> None:
        measured.extend(new)
        measured.sort(key=lambda ir: (ir[0], STAGES.index(ir[1].stage), ir[1].batch_size))
        # every row's ratios again: a torch row measured later (sequential mode) gives earlier rows theirs
        rows = with_torch_ratios([asdict(r) for _, r in measured])
        position = {id(r): k for k, (_, r) in enumerate(measured)}
        new_rows = [rows[position[id(r)]] for _, r in new]
        if rows_file is not None:  # first: a process killed while the JSON is rewritten still leaves these lines
            with open(rows_file, "a") as f:
                for row in new_rows:
                    f.write(json.dumps(row) + "\n")
                    f.flush()
        result["rows"] = rows
        if output:
            write_json(output, result)
        for row in new_rows:
            progress(json.dumps(row))

    specs = list(enumerate(backends))
    groups = [specs] if interleave else [[spec] for spec in specs]
    try:
        with tempfile.TemporaryDirectory(prefix="pickscore-bench-") as tmp:
            inputs = None
            for group in groups:
                scorers: list[tuple[int, PickScorer]] = []
                spec_of: dict[int, BenchSpec] = {}  # id(scorer) -> the spec it was opened from (auto resolved)
                weights_of: dict[int, float | None] = {}  # id(scorer) -> device MiB its opening added (cuda backends)
                shared_cpu_clip: dict[str, Any] = {}  # per group: sequential mode holds one backend at a time
                for index, asked in group:
                    spec = asked
                    try:
                        spec = resolved_spec(artifacts, asked)
                        backend, weights = device_memory_added(
                            gpu_probe_for(spec.name), lambda: opened(open_backend_spec(artifacts, spec, model_source,
                                                                                       threads, shared_cpu_clip)))
                        scorers.append((index, PickScorer.from_backend(artifacts, backend, workers=workers)))
                        spec_of[id(scorers[-1][1])] = spec
                        weights_of[id(scorers[-1][1])] = weights
                    except Exception as e:  # noqa: BLE001 - every cell of this backend is an error row
                        device = BACKENDS[spec.name].device if spec.name in BACKENDS else "-"
                        requested = spec.requested or (AUTO if asked.name == AUTO else None)
                        publish([(index, error_row(spec.name, spec.precision, device, stage, b, e, spec.options_text,
                                                   requested))
                                 for stage in stages for b in batch_sizes])
                        release_memory()
                if not scorers:
                    continue
                inputs = inputs or bench_inputs(scorers[0][1], max(batch_sizes), Path(tmp), n_jpegs, stages)
                cuda = any(s.backend.device == "cuda" for _, s in scorers)
                if cuda and result.get("gpu") is None:
                    result["gpu"] = gpu_info()
                gpu = gpu_memory_probe() if cuda else None
                index_of = {id(s): i for i, s in scorers}
                for b in batch_sizes:
                    cells = [(scorer, stage, spec_of[id(scorer)]) for stage in stages for _, scorer in scorers]
                    for block in [cells] if interleave else [[cell] for cell in cells]:
                        timed = time_block(block, b, inputs, min_calls, min_seconds, gpu, workload)  # one per cell
                        for r, (scorer, _, _) in zip(timed, block):
                            r.gpu_weights_mb = weights_of[id(scorer)]
                        publish([(index_of[id(scorer)], r) for r, (scorer, _, _) in zip(timed, block)])
                for _, scorer in scorers:
                    scorer.close()
                del scorers
    except BaseException as e:
        result["stopped_by"] = error_text(e)
        if output:
            write_json(output, result)
        raise
    result["complete"] = True
    result["seconds"] = round(time.time() - started, 1)
    if output:
        write_json(output, result)
    return result


def plot(result: dict, path: Path) -> None:
    """items/s per backend, one panel per stage, batch sizes side by side."""
    matplotlib = require("matplotlib", "--plot")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "--plot")
    rows = [r for r in result["rows"] if r.get("error") is None]  # a failed cell has no bar
    stages = list(dict.fromkeys(r["stage"] for r in rows)) or ["no cell measured"]
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        these = [r for r in rows if r["stage"] == stage]
        engines = list(dict.fromkeys(row_label(r) for r in these))
        batches = sorted({r["batch_size"] for r in these})
        width = 0.8 / max(len(engines), 1)
        for k, engine in enumerate(engines):
            vals = [next((r["items_per_s"] for r in these if row_label(r) == engine
                          and r["batch_size"] == b), 0) for b in batches]
            ax.bar([i + k * width for i in range(len(batches))], vals, width, label=engine)
        ax.set_xticks([i + width * (len(engines) - 1) / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_title(stage)
        ax.set_ylabel("items/s")
        ax.set_yscale("log" if stage.startswith("text") else "linear")
    if rows:
        axes[0][0].legend(fontsize=8)
    title = "PickScore throughput" + (" (random weights)" if result.get("random_weights") else "")
    fig.suptitle(f"{title} - {result['machine']['cpu']}, {result['machine']['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_line(machine: dict) -> str:
    """The machine in one line, SIMD flags included (AVX-512 VNNI / BF16 move int8 and bf16 several-fold, and the
    same VM name has come with and without them)."""
    simd = ", ".join(machine.get("simd") or []) or "none of the flags int8 and bf16 kernels use"
    return (f"Machine: {machine.get('cpu') or 'unknown CPU'}, {machine.get('usable_cores')} usable cores, "
            f"{machine.get('threads')} threads; SIMD: {simd}")


# Columns the markdown table adds when a run has them: (row field, heading, format)
GPU_MEMORY_COLUMNS = (("gpu_weights_mb", "GPU weights MB", "{:.0f}"), ("gpu_workspace_mb", "GPU workspace MB", "{:.0f}"))
COLOCATED_COLUMNS = (("colocated_items_per_s", "colocated items/s", "{:.3f}"),
                     ("workload_alone_iters_per_s", "trainer it/s alone", "{:.1f}"),
                     ("workload_colocated_iters_per_s", "trainer it/s colocated", "{:.1f}"),
                     ("colocated_slowdown", "trainer slowdown", "{:.2f}x"))


def gpu_memory_targets(rows: Sequence[dict], limit_mb: float = GPU_MEMORY_TARGET_MB,
                       batch: int = GPU_MEMORY_TARGET_BATCH) -> list[dict]:
    """Each fp16 GPU backend of `rows` (by row_label) against the target: its weights plus the largest workspace
    of its measured cells at `batch` (the towers do not run at once: the peak is the larger one), as {label,
    weights_mb, workspace_mb, total_mb, within}; total_mb and within are None where a figure is missing."""
    out: dict[str, dict] = {}
    for r in rows:
        if r.get("device") != "cuda" or r.get("precision") != "fp16":
            continue
        entry = out.setdefault(row_label(r), {"label": row_label(r), "weights_mb": None, "workspace_mb": None})
        if r.get("gpu_weights_mb") is not None:
            entry["weights_mb"] = r["gpu_weights_mb"]
        if r.get("batch_size") == batch and not r.get("error") and r.get("gpu_workspace_mb") is not None:
            entry["workspace_mb"] = max(entry["workspace_mb"] or 0, r["gpu_workspace_mb"])
    for entry in out.values():
        known = entry["weights_mb"] is not None and entry["workspace_mb"] is not None
        entry["total_mb"] = entry["weights_mb"] + entry["workspace_mb"] if known else None
        entry["within"] = entry["total_mb"] <= limit_mb if known else None
    return list(out.values())


def target_lines(result: dict) -> list[str]:
    """What the GPU figures are judged against, under the table of a run with GPU rows or --colocate: targets,
    not results, until a GPU run records them."""
    rows = result["rows"]
    lines = []
    if any(r.get("device") == "cuda" for r in rows):
        lines += ["", f"Target (not yet recorded on a GPU): the reward's device memory, vision fp16 + text, weights + "
                      f"workspace at batch {GPU_MEMORY_TARGET_BATCH} <= {GPU_MEMORY_TARGET_MB} MB."]
        checked = gpu_memory_targets(rows)
        for e in checked:
            figures = " + ".join(f"{k.split('_')[0]} unknown" if e[k] is None else f"{e[k]:.0f} MB {k.split('_')[0]}"
                                 for k in ("weights_mb", "workspace_mb"))
            verdict = (": not judged" if e["total_mb"] is None
                       else f" = {e['total_mb']:.0f} MB, {'within' if e['within'] else 'OVER'} the target")
            lines.append(f"- {e['label']}: {figures}{verdict}")
        if not checked:
            lines.append("- no fp16 GPU backend in this run: nothing to judge")
    workload = result.get("colocated_workload")
    if workload:
        lines += ["", f"Colocated: trainer stand-in {workload.get('what')} ({workload.get('tflop_per_iteration')} TFLOP "
                      f"per iteration); trainer slowdown = its it/s alone / beside the cell (1.00x: untouched). "
                      f"No target set yet."]
    return lines


def markdown_table(result: dict) -> str:
    """The rows as a markdown table (ratios against torch fp32 / bf16 as "1.93x"), under the machine's line when
    the result records one. Runs with GPU rows add the GPU memory columns and the memory target under the
    table (target_lines); runs with --colocate the colocated columns."""
    rows = result["rows"]
    colocated_keys = [key for key, _, _ in COLOCATED_COLUMNS] + ["colocated_error"]
    colocated_run = result.get("colocated_workload") or any(r.get(k) is not None for r in rows for k in colocated_keys)
    extra = ((GPU_MEMORY_COLUMNS if any(r.get("device") == "cuda" for r in rows) else ())
             + (COLOCATED_COLUMNS if colocated_run else ()))
    head_lines = [machine_line(result["machine"]), ""] if result.get("machine") else []
    lines = head_lines + [
        "| backend | precision | options | device | stage | batch | items/s | vs torch fp32 | vs torch bf16 | p50 ms | p95 ms "
        "| peak RSS MB | GPU MB |" + "".join(f" {heading} |" for _, heading, _ in extra),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra)]
    for r in with_torch_ratios(rows):
        backend = f"{r['backend']} ({r['requested']})" if r.get("requested") else r["backend"]
        precision = f"{r['precision']} (runs {r['runs']})" if r.get("runs") else r["precision"]
        head = (f"| {backend} | {precision} | {r.get('options') or '-'} | {r.get('device', 'cpu')} | {r['stage']} | "
                f"{r['batch_size']} |")
        if r.get("error"):
            error = r["error"].replace("|", "\\|")
            lines.append(f"{head} error: {error} | - | - | - | - | - | -" + " | -" * len(extra) + " |")
            continue
        ratios = " | ".join("-" if r[key] is None else f"{r[key]:.2f}x" for key in TORCH_REFERENCES)
        gpu = "-" if r.get("gpu_mem_mb") is None else f"{r['gpu_mem_mb']:.0f}"
        cells = ["-" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in extra]
        if r.get("colocated_error"):
            cells[len(extra) - len(COLOCATED_COLUMNS)] = "error: " + r["colocated_error"].replace("|", "\\|")
        lines.append(f"{head} {r['items_per_s']:.3f} | {ratios} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | "
                     f"{r['peak_rss_mb']:.0f} | {gpu} |" + "".join(f" {c} |" for c in cells))
    return "\n".join(lines + target_lines(result))
