"""`pickscore bench`: every backend measured side by side in one process, on the same inputs, as
comparable rows {backend, precision, device, stage, batch_size, items_per_s, p50_ms, p95_ms, peak_rss_mb,
gpu_mem_mb}.

Backends are (registry name, precision) pairs: `torch:fp32` is the model card's PyTorch code,
`torch:bf16` the same under CPU autocast, `onnx-cpu:int8` the runtime's fast CPU path. Each backend is
timed with its own clock, which waits for the device before reading the time (timm's
`cuda_timestamp` idea), so GPU numbers are not launch times. gpu_mem_mb is the device memory in use
(every process's, as cudaMemGetInfo reports it) at its peak while the row was timed, for rows of cuda
backends: like peak_rss_mb, interleaved rows share one figure for all the backends held at once.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from .artifacts import Artifacts
from .backends import Backend, create_backend
from .errors import PickScoreError
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


@dataclass
class Row:
    backend: str
    precision: str
    device: str
    stage: str
    batch_size: int
    items_per_s: float
    p50_ms: float
    p95_ms: float
    peak_rss_mb: float
    gpu_mem_mb: float | None = None  # cuda backends only


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
            self.gpu_peak = max(self.gpu_peak or 0.0, self._gpu())

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
               clocks: Sequence[Callable[[], float]] | None = None) -> list[list[float]]:
    """Seconds per call of each fn, after one warm-up call each, timed in round-robin rounds; a fn
    leaves the rounds once it has at least min_calls calls and min_seconds in total. Interleaving
    makes a slow drift in the machine's speed (a busy neighbour, clock changes) hit every fn alike,
    so their ratios stay honest. clocks: one per fn (default: the host's perf_counter)."""
    clocks = clocks or [time.perf_counter] * len(fns)
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]

    def wants_more(t: list[float]) -> bool:
        return len(t) < min_calls or sum(t) < min_seconds

    while any(wants_more(t) for t in times):
        for fn, clock, t in zip(fns, clocks, times):
            if not wants_more(t):
                continue
            t0 = clock()
            fn()
            t.append(clock() - t0)
    return times


def row_from_times(backend: Backend, stage: str, batch: int, items_per_call: int, times: list[float], peak: float,
                   gpu_peak: float | None = None) -> Row:
    ms = np.array(times) * 1000
    gpu = round(gpu_peak) if gpu_peak is not None and backend.device == "cuda" else None
    return Row(backend.name, backend.precision, backend.device, stage, batch,
               round(items_per_call * len(times) / sum(times), 3),
               round(float(np.percentile(ms, 50)), 3), round(float(np.percentile(ms, 95)), 3), round(peak), gpu)


def open_backends(artifacts: Artifacts, specs: Sequence[tuple[str, str | None]], model_source: Any,
                  threads: int | None) -> Iterator[Backend]:
    """The backends of `specs`; CPU torch backends share one loaded model (autocast leaves weights fp32)."""
    shared_cpu_clip: dict[str, Any] = {}
    for name, precision in specs:
        options: dict[str, Any] = {"threads": threads}
        if name in ("torch", "torch-cuda"):
            options["model_source"] = model_source
        if name == "torch":
            if "clip" not in shared_cpu_clip:
                from .optional import export_tools

                tools = export_tools("the torch backends", ("torch", "transformers"), "torch")
                shared_cpu_clip["clip"] = tools.load_clip(model_source or tools.source_from_manifest(artifacts.manifest))
            options["clip"] = shared_cpu_clip["clip"]
        yield create_backend(artifacts, name, precision, **options)


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


def run_bench(artifacts_dir: str | Path, backends: Sequence[tuple[str, str | None]], batch_sizes: Sequence[int],
              stages: Sequence[str] = DEFAULT_STAGES, model_source: Any = None, threads: int | None = None,
              workers: int | None = None, min_calls: int = 3,
              min_seconds: float = 2.0, n_jpegs: int | None = None, interleave: bool = True,
              progress: Callable[[str], None] = print) -> dict:
    """interleave=True: every backend is open at once, and for each batch size every (backend, stage)
    is timed in the same rounds, so backend-vs-backend and e2e-vs-vision ratios hold on a machine
    whose speed drifts; peak_rss_mb is then the whole process's. interleave=False: one backend in
    memory at a time, one (stage, batch) after another, so peak_rss_mb is per backend."""
    artifacts = Artifacts.load(artifacts_dir, hash_check="size")
    n_jpegs = n_jpegs or 2 * max(batch_sizes)
    rows: list[Row] = []
    groups = [list(backends)] if interleave else [[spec] for spec in backends]
    with tempfile.TemporaryDirectory(prefix="pickscore-bench-") as tmp:
        inputs = None
        for group in groups:
            scorers = [PickScorer.from_backend(artifacts, b, workers=workers) for b in open_backends(artifacts, group, model_source, threads)]
            inputs = inputs or bench_inputs(scorers[0], max(batch_sizes), Path(tmp), n_jpegs, stages)
            gpu = gpu_memory_probe() if any(s.backend.device == "cuda" for s in scorers) else None
            for b in batch_sizes:
                cells = [(scorer, stage) for stage in stages for scorer in scorers]
                blocks = [cells] if interleave else [[cell] for cell in cells]
                for block in blocks:
                    calls = [stage_call(scorer, stage, b, inputs) for scorer, stage in block]
                    with PeakRss(gpu) as rss:
                        times = time_calls([call for call, _ in calls], min_calls, min_seconds,
                                           [device_clock(scorer.backend) for scorer, _ in block])
                    for (scorer, stage), (_, items), t in zip(block, calls, times):
                        rows.append(row_from_times(scorer.backend, stage, b, items, t, rss.peak, rss.gpu_peak))
                        progress(json.dumps(asdict(rows[-1])))
            for scorer in scorers:
                scorer.close()
            del scorers
    engines = list(dict.fromkeys((r.backend, r.precision) for r in rows))  # in --backends order
    rows.sort(key=lambda r: (engines.index((r.backend, r.precision)), STAGES.index(r.stage), r.batch_size))
    return {"machine": machine_info(threads), "artifacts": str(artifacts_dir), "random_weights": artifacts.random_weights,
            "interleaved": interleave, "n_jpegs_e2e": n_jpegs, "e2e_workers": workers or default_workers(), "rows": [asdict(r) for r in rows]}


SIMD_FLAGS = {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}


def machine_info(threads: int | None) -> dict:
    import onnxruntime

    cpu, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
        flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    except OSError:
        pass
    # The same VM name has come with and without AVX-512 VNNI / BF16: int8 and bf16 speeds hinge on them.
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads or os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "platform": platform.platform(),
            "simd": sorted(flags & SIMD_FLAGS)}


def plot(result: dict, path: Path) -> None:
    """items/s per backend, one panel per stage, batch sizes side by side."""
    matplotlib = require("matplotlib", "--plot")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "--plot")
    rows = result["rows"]
    stages = list(dict.fromkeys(r["stage"] for r in rows))
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
        gpu = "-" if r.get("gpu_mem_mb") is None else f"{r['gpu_mem_mb']:.0f}"
        lines.append(f"| {r['backend']} | {r['precision']} | {r.get('device', 'cpu')} | {r['stage']} | {r['batch_size']} | "
                     f"{r['items_per_s']:.3f} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | {r['peak_rss_mb']:.0f} | {gpu} |")
    return "\n".join(lines)
