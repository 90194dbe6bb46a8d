"""`pickscore bench`: every backend measured side by side in one process, on the same inputs, as
comparable rows {backend, precision, stage, batch_size, items_per_s, p50_ms, p95_ms, peak_rss_mb}.

Backends are named "<engine>-<precision>" (onnx-fp32, onnx-cuda-fp16, ...) or "torch" (the model
card's PyTorch code, from the [export] extra; its weights come from --model or the artifacts' source).
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .artifacts import Artifacts
from .backends import Backend, create_backend

STAGES = ("vision", "text")


@dataclass
class Row:
    backend: str
    precision: str
    stage: str
    batch_size: int
    items_per_s: float
    p50_ms: float
    p95_ms: float
    peak_rss_mb: float


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the process's lifetime peak is the best we have
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRss:
    """Samples resident memory every 50 ms while the block runs."""

    def __enter__(self) -> "PeakRss":
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def time_calls(fn: Callable[[], object], min_calls: int, min_seconds: float) -> list[float]:
    """Seconds per call after one warm-up call; at least min_calls calls and min_seconds in total."""
    fn()
    times: list[float] = []
    while len(times) < min_calls or sum(times) < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def row_from_times(backend: Backend, stage: str, batch: int, times: list[float], peak: float) -> Row:
    ms = np.array(times) * 1000
    return Row(backend.name, backend.precision, stage, batch, round(batch * len(times) / sum(times), 3),
               round(float(np.percentile(ms, 50)), 1), round(float(np.percentile(ms, 95)), 1), round(peak))


def open_backends(artifacts: Artifacts, names: Sequence[str], model: str | None, random_init: bool, seed: int,
                  threads: int | None) -> Iterator[Backend]:
    """Yield one backend at a time, so only one set of weights is in memory while it is measured."""
    for name in names:
        if name == "torch":
            from .export_cache import _export_modules

            ModelSource, _ = _export_modules()
            from pickscore_export.source import load_clip
            from pickscore_export.torch_towers import TorchBackend
            from pickscore_export.verify import source_from_manifest

            source = ModelSource(model, random_init=random_init, seed=seed) if model else source_from_manifest(artifacts.manifest)
            yield TorchBackend(load_clip(source), threads=threads)
        else:
            engine, _, precision = name.rpartition("-")
            engine = {"onnx": "onnx-cpu"}.get(engine, engine)
            yield create_backend(artifacts, engine, precision, threads=threads)


def bench_inputs(artifacts: Artifacts, max_batch: int):
    """Preprocessed generated images and tokenised prompts, built by the runtime's own code."""
    from .preprocess import PreprocessConfig, Preprocessor
    from .tokenizer import ClipTokenizer
    from .samples_light import bench_images, bench_prompts

    pre = Preprocessor(PreprocessConfig.from_json(artifacts.manifest["preprocessing"]))
    pixels = np.stack([pre(img) for img in bench_images(max_batch)])
    tok = artifacts.manifest["tokenizer"]
    ids = ClipTokenizer(artifacts.tokenizer_file, tok["max_length"], tok["pad_token"])(bench_prompts(max_batch)).input_ids
    return pixels, ids


def run_bench(artifacts_dir: str | Path, backends: Sequence[str], batch_sizes: Sequence[int],
              stages: Sequence[str] = STAGES, model: str | None = None, random_init: bool = False, seed: int = 0,
              threads: int | None = None, min_calls: int = 3, min_seconds: float = 2.0,
              progress: Callable[[str], None] = print) -> dict:
    artifacts = Artifacts.load(artifacts_dir, hash_check="size")
    pixels, ids = bench_inputs(artifacts, max(batch_sizes))
    rows: list[Row] = []
    for backend in open_backends(artifacts, backends, model, random_init, seed, threads):
        for stage in stages:
            for b in batch_sizes:
                call = {"vision": lambda: backend.embed_images(pixels[:b]), "text": lambda: backend.embed_text(ids[:b])}[stage]
                with PeakRss() as rss:
                    times = time_calls(call, min_calls, min_seconds)
                rows.append(row_from_times(backend, stage, b, times, rss.peak))
                progress(json.dumps(asdict(rows[-1])))
        del backend
    return {"machine": machine_info(threads), "artifacts": str(artifacts_dir), "random_weights": artifacts.random_weights,
            "rows": [asdict(r) for r in rows]}


def machine_info(threads: int | None) -> dict:
    import onnxruntime

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads or os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "platform": platform.platform()}


def markdown_table(result: dict) -> str:
    lines = ["| backend | precision | stage | batch | items/s | p50 ms | p95 ms | peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['backend']} | {r['precision']} | {r['stage']} | {r['batch_size']} | {r['items_per_s']:.3f} | "
                     f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)
