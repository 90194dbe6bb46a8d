"""Shared by the scripts that weigh vision-tower candidates against what ships (int8_candidates.py,
int8_variants.py, gelu_reorder_check.py, openvino_check.py): arguments, inputs, candidates behind the
runtime's Backend interface, timing in interleaved rounds with `pickscore bench`'s own `time_calls` and
per-backend clock, and the JSON report.

Speed: p50 over --rounds interleaved calls. Accuracy: image embeddings of the 18 built-in verify images
(runtime preprocessing). A candidate is only a candidate: `pickscore verify` against the PyTorch
reference (gate v2) decides whether anything ships. Needs no torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pickscore_export.samples import write_images
from pickscore_runtime.artifacts import Artifacts
from pickscore_runtime.backends import BackendBase
from pickscore_runtime.ort_sessions import session_options
from pickscore_runtime.bench import device_clock, time_calls
from pickscore_runtime.images import open_image
from pickscore_runtime.preprocess import PreprocessConfig, Preprocessor


class VisionCandidate(BackendBase):
    """A vision tower under test behind the runtime's Backend interface (it embeds images only)."""

    def __init__(self, name: str, precision: str, run: Callable[[np.ndarray], np.ndarray]):
        self.name, self.precision, self.batch_size = name, precision, 8
        self._run = run

    def embed_images(self, pixel_values: Any) -> np.ndarray:
        return self._run(np.ascontiguousarray(pixel_values))


def ort_candidate(path: Path, name: str, precision: str) -> VisionCandidate:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])  # as the runtime runs it
    return VisionCandidate(name, precision, lambda pixels: session.run(None, {"pixel_values": pixels})[0])


def openvino_candidate(model: Any, name: str, precision: str, inference_precision: str | None = None) -> VisionCandidate:
    """`model`: a path OpenVINO reads (ONNX or IR .xml) or an openvino.Model."""
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if inference_precision:
        config["INFERENCE_PRECISION_HINT"] = inference_precision
    compiled = core.compile_model(core.read_model(str(model)) if isinstance(model, (str, Path)) else model, "CPU", config)
    request = compiled.create_infer_request()
    return VisionCandidate(name, precision, lambda pixels: np.array(request.infer({0: pixels})[0]))


def parse_args(doc: str, add: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", dest="json_out")
    if add:
        add(ap)
    return ap.parse_args()


def preprocessor(artifacts: Artifacts) -> Preprocessor:
    return Preprocessor(PreprocessConfig.from_json(artifacts.manifest["preprocessing"]))


def verify_pixels(artifacts: Artifacts, folder: Path, seed: int = 0) -> np.ndarray:
    pre = preprocessor(artifacts)
    return np.stack([pre(open_image(p, p.name), p.name) for p in write_images(folder, seed=seed)])


def embed_all(candidate: VisionCandidate, pixels: np.ndarray, batch: int = 6) -> np.ndarray:
    return np.concatenate([candidate.embed_images(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])


def p50_seconds(candidates: dict[str, VisionCandidate], pixels: np.ndarray, rounds: int, batch: int = 1) -> dict[str, float]:
    """Per-image p50 of every candidate at `batch`, timed in interleaved rounds."""
    some = pixels[:batch]
    times = time_calls([lambda c=c: c.embed_images(some) for c in candidates.values()], min_calls=rounds, min_seconds=0.0,
                       clocks=[device_clock(c) for c in candidates.values()])
    return {name: float(np.median(t)) / batch for name, t in zip(candidates, times)}


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * b, axis=1).min())


def report(rows: list[dict], args: argparse.Namespace, **extra: Any) -> None:
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rounds": args.rounds, **extra, "rows": rows}, indent=1) + "\n")
