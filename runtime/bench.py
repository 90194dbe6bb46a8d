"""`pickscore bench`: every backend measured side by side in one process, on the same inputs, as
comparable rows {backend, precision, device, stage, batch_size, items_per_s, p50_ms, p95_ms, peak_rss_mb,
gpu_mem_mb, error}.

Backends are (registry name, precision) pairs: `torch:fp32` is the model card's PyTorch code,
`torch:bf16` the same under CPU autocast, `onnx-cpu:int8` the runtime's fast CPU path. Each backend is
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
machine (pickscore_runtime.machine).

PRESETS are named scenarios (backends, batch sizes, stages, timing); benchmarks/gpu/acceptance.py runs `gpu`.
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

from .artifacts import Artifacts
from .backends import BACKENDS, Backend, create_backend
from .errors import PickScoreError
from .machine import code_version, gpu_info, machine_info
from .optional import require
from .pipeline import default_workers
from .scorer import PickScorer

STAGES = ("vision", "text", "text-cached", "e2e", "e2e-png", "tensors-exact", "tensors-fast")
DEFAULT_STAGES = STAGES[:5]  # the tensors stages are asked for by name (RL reward loops, the GPU acceptance)
TENSOR_SIZE = 512  # tensors stages: uint8 RGB generations of this size, as an RL loop holds them
BENCH_PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "a cozy cabin in the snowy mountains at dusk, warm light in the windows, highly detailed",
    "oil painting of a cat in the style of van gogh",
    "minimalist logo, red circle on a white background",
]


@dataclass(frozen=True)
class Preset:
    """A named scenario for `pickscore bench`: what to time, and how long. Meant for a `--preset NAME` flag
    (flags given beside it replacing its values); the CLI does not take it yet."""

    about: str
    backends: tuple[tuple[str, str], ...]
    batch_sizes: tuple[int, ...]
    stages: tuple[str, ...]
    min_calls: int = 3
    min_seconds: float = 2.0
    e2e_images: int | None = None  # None: twice the largest batch


PRESETS: dict[str, Preset] = {
    "cpu": Preset("the shipped CPU paths against the model card's PyTorch code (fp32 and bf16 autocast), vision "
                  "tower: RESULTS.md's comparison",
                  (("torch", "fp32"), ("torch", "bf16"), ("onnx-cpu", "fp32"), ("onnx-cpu", "int8")), (1, 4), ("vision",),
                  min_calls=2, min_seconds=1.0),
    "cpu-e2e": Preset("files on disk to scores on the CPU: vision tower alone against the end-to-end JPEG and PNG "
                      "pipeline (decoding threads: --workers)",
                      (("onnx-cpu", "int8"), ("onnx-cpu", "fp32")), (4,), ("vision", "e2e", "e2e-png"), e2e_images=8),
    "cpu-rl": Preset("an RL reward loop on the CPU: generations already in memory (uint8 tensors, exact and fast "
                     "resize) scored against prompts already in the text cache",
                     (("onnx-cpu", "int8"), ("onnx-cpu", "fp32")), (1, 4, 8), ("tensors-exact", "tensors-fast", "text-cached"),
                     min_calls=2, min_seconds=1.0),
    "gpu": Preset("every GPU backend against torch-cuda fp16 and the fp32 model card code: what "
                  "benchmarks/gpu/acceptance.py runs (it drops the backends this machine cannot run)",
                  (("tensorrt", "fp16"), ("onnx-cuda", "fp16"), ("torch-cuda", "fp16"), ("torch-cuda", "fp32")),
                  (16, 64, 128, 256), ("vision", "text", "e2e", "e2e-png", "tensors-exact", "tensors-fast"),
                  min_calls=3, min_seconds=0.5, e2e_images=256),
    "gpu-rl": Preset("an RL reward loop on a GPU: generations as device tensors scored against cached prompts",
                     (("tensorrt", "fp16"), ("onnx-cuda", "fp16"), ("torch-cuda", "fp16")), (16, 64, 256),
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
    except PickScoreError:
        pass
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
               errors: list[BaseException | None] | None = None) -> list[list[float]]:
    """Seconds per call of each fn, after one warm-up call each, timed in round-robin rounds; a fn
    leaves the rounds once it has at least min_calls calls and min_seconds in total. Interleaving
    makes a slow drift in the machine's speed (a busy neighbour, clock changes) hit every fn alike,
    so their ratios stay honest. clocks: one per fn (default: the host's perf_counter).

    errors: without it, the first exception propagates. Given a list, it receives one entry per fn:
    None, or the Exception that fn (or its clock) raised, warming up or timed; that fn leaves the rounds
    with no times (a failed cell, not a shorter measurement) and the others go on."""
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

    for i in range(len(fns)):
        call(i, timed=False)
    while any(wants_more(i) for i in range(len(fns))):
        for i in range(len(fns)):
            if wants_more(i):
                call(i, timed=True)
    if errors is not None:
        errors[:] = failed
    return times


def row_from_times(backend: Backend, stage: str, batch: int, items_per_call: int, times: list[float], peak: float,
                   gpu_peak: float | None = None) -> Row:
    ms = np.array(times) * 1000
    gpu = round(gpu_peak) if gpu_peak is not None and backend.device == "cuda" else None
    return Row(backend.name, backend.precision, backend.device, stage, batch,
               round(items_per_call * len(times) / sum(times), 3),
               round(float(np.percentile(ms, 50)), 3), round(float(np.percentile(ms, 95)), 3), round(peak), gpu)


def error_text(e: BaseException) -> str:
    """One line naming what a failed cell raised: its type and message (lines joined, at most 500 characters)."""
    message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{type(e).__name__}: {message[:500]}" if message else type(e).__name__


def error_row(name: str, precision: str | None, device: str, stage: str, batch: int, error: BaseException | str) -> Row:
    text = error if isinstance(error, str) else error_text(error)
    return Row(name, precision or "default", device, stage, batch, None, None, None, None, None, text)


def open_backend_spec(artifacts: Artifacts, spec: tuple[str, str | None], model_source: Any, threads: int | None,
                      shared_cpu_clip: dict[str, Any]) -> Backend:
    """The backend of one spec; CPU torch backends share one loaded model (autocast leaves weights fp32)."""
    name, precision = spec
    options: dict[str, Any] = {"threads": threads}
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
    if stage == "vision":
        return (lambda: backend.embed_images(inputs.pixels[:batch])), batch
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


def time_block(block: Sequence[tuple[PickScorer, str]], batch: int, inputs: BenchInputs, min_calls: int,
               min_seconds: float, gpu: Callable[[], float] | None) -> list[Row]:
    """One row per (scorer, stage) of `block`, timed in the same interleaved rounds; a cell that raises
    (building its call, warming up or timed) becomes an error row and the others are still measured."""
    rows: list[Row | None] = [None] * len(block)
    calls = []  # (position in block, call, items per call)
    for k, (scorer, stage) in enumerate(block):
        try:
            call, items = stage_call(scorer, stage, batch, inputs)
            calls.append((k, call, items))
        except Exception as e:  # noqa: BLE001 - the cell's error
            rows[k] = error_row(scorer.backend.name, scorer.backend.precision, scorer.backend.device, stage, batch, e)
    errors: list[BaseException | None] = []
    with PeakRss(gpu) as rss:
        times = time_calls([call for _, call, _ in calls], min_calls, min_seconds,
                           [device_clock(block[k][0].backend) for k, _, _ in calls], errors=errors)
    for (k, _, items), t, error in zip(calls, times, errors):
        scorer, stage = block[k]
        rows[k] = (error_row(scorer.backend.name, scorer.backend.precision, scorer.backend.device, stage, batch, error)
                   if error is not None else row_from_times(scorer.backend, stage, batch, items, t, rss.peak, rss.gpu_peak))
    if any(r.error for r in rows if r is not None):
        release_memory()
    return [r for r in rows if r is not None]


def run_bench(artifacts_dir: str | Path, backends: Sequence[tuple[str, str | None]], batch_sizes: Sequence[int],
              stages: Sequence[str] = DEFAULT_STAGES, model_source: Any = None, threads: int | None = None,
              workers: int | None = None, min_calls: int = 3,
              min_seconds: float = 2.0, n_jpegs: int | None = None, interleave: bool = True,
              progress: Callable[[str], None] = print, output: str | Path | None = None,
              command: Sequence[str] | None = None) -> dict:
    """interleave=True: every backend is open at once, and for each batch size every (backend, stage)
    is timed in the same rounds, so backend-vs-backend and e2e-vs-vision ratios hold on a machine
    whose speed drifts; peak_rss_mb is then the whole process's. interleave=False: one backend in
    memory at a time, one (stage, batch) after another, so peak_rss_mb is per backend.

    A backend that cannot open gives an error row for each of its cells; a cell that raises gives one
    error row; everything else is measured. output: the JSON, rewritten after every timed block (and
    once more, with `complete` true, at the end; with `stopped_by` if an exception ends the run).
    progress: each row as one line of JSON, once measured. command: the command line to record
    (default sys.argv)."""
    started = time.time()
    artifacts = Artifacts.load(artifacts_dir, hash_check="size")
    n_jpegs = n_jpegs or 2 * max(batch_sizes)
    result: dict[str, Any] = {
        "code": code_version(), "command": shlex.join(sys.argv if command is None else command), "cwd": os.getcwd(),
        "started_utc": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(threads), "artifacts": str(artifacts_dir), "random_weights": artifacts.random_weights,
        "interleaved": interleave, "n_jpegs_e2e": n_jpegs, "e2e_workers": workers or default_workers(),
        "complete": False, "rows": []}
    measured: list[tuple[int, Row]] = []  # (index of the backend spec, row): rows sort in --backends order

    def publish(rows: list[tuple[int, Row]]) -> None:
        measured.extend(rows)
        measured.sort(key=lambda ir: (ir[0], STAGES.index(ir[1].stage), ir[1].batch_size))
        result["rows"] = [asdict(r) for _, r in measured]
        if output:
            write_json(output, result)
        for _, r in rows:
            progress(json.dumps(asdict(r)))

    specs = list(enumerate(backends))
    groups = [specs] if interleave else [[spec] for spec in specs]
    try:
        with tempfile.TemporaryDirectory(prefix="pickscore-bench-") as tmp:
            inputs = None
            for group in groups:
                scorers: list[tuple[int, PickScorer]] = []
                shared_cpu_clip: dict[str, Any] = {}  # per group: sequential mode holds one backend at a time
                for index, (name, precision) in group:
                    try:
                        backend = open_backend_spec(artifacts, (name, precision), model_source, threads, shared_cpu_clip)
                        scorers.append((index, PickScorer.from_backend(artifacts, backend, workers=workers)))
                    except Exception as e:  # noqa: BLE001 - every cell of this backend is an error row
                        device = BACKENDS[name].device if name in BACKENDS else "-"
                        publish([(index, error_row(name, precision, device, stage, b, e)) for stage in stages for b in batch_sizes])
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
                    cells = [(scorer, stage) for stage in stages for _, scorer in scorers]
                    for block in [cells] if interleave else [[cell] for cell in cells]:
                        rows = time_block(block, b, inputs, min_calls, min_seconds, gpu)  # one per cell, in order
                        publish([(index_of[id(scorer)], r) for r, (scorer, _) in zip(rows, block)])
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
        engines = list(dict.fromkeys(f"{r['backend']}/{r['precision']}" for r in these))
        batches = sorted({r["batch_size"] for r in these})
        width = 0.8 / max(len(engines), 1)
        for k, engine in enumerate(engines):
            vals = [next((r["items_per_s"] for r in these if f"{r['backend']}/{r['precision']}" == engine
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


def markdown_table(result: dict) -> str:
    lines = ["| backend | precision | device | stage | batch | items/s | p50 ms | p95 ms | peak RSS MB | GPU MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r.get("error"):
            error = r["error"].replace("|", "\\|")
            lines.append(f"| {r['backend']} | {r['precision']} | {r.get('device', 'cpu')} | {r['stage']} | {r['batch_size']} | "
                         f"error: {error} | - | - | - | - |")
            continue
        gpu = "-" if r.get("gpu_mem_mb") is None else f"{r['gpu_mem_mb']:.0f}"
        lines.append(f"| {r['backend']} | {r['precision']} | {r.get('device', 'cpu')} | {r['stage']} | {r['batch_size']} | "
                     f"{r['items_per_s']:.3f} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | {r['peak_rss_mb']:.0f} | {gpu} |")
    return "\n".join(lines)
