"""Shared by the scripts that weigh vision-tower candidates against what ships (int8_variants.py,
gelu_reorder_check.py, openvino_check.py): arguments, inputs, an ONNX Runtime runner, timing in
interleaved rounds (the same `time_calls` as `pickscore bench`) and the JSON report.

Speed: batch 1, p50 over --rounds interleaved calls. Accuracy: image embeddings of the 18 built-in
verify images (runtime preprocessing). A candidate is only a candidate: `pickscore verify` against
the PyTorch reference decides whether anything ships. Needs no torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np

from pickscore_export.samples import write_images
from pickscore_runtime.artifacts import Artifacts
from pickscore_runtime.backends.onnxruntime import session_options
from pickscore_runtime.bench import time_calls
from pickscore_runtime.images import open_image
from pickscore_runtime.preprocess import PreprocessConfig, Preprocessor

Runner = Callable[[np.ndarray], np.ndarray]  # pixel_values [B,3,224,224] -> image_embeds [B,D]


def parse_args(doc: str, add: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", dest="json_out")
    if add:
        add(ap)
    return ap.parse_args()


def verify_pixels(artifacts: Artifacts, folder: Path) -> np.ndarray:
    pre = Preprocessor(PreprocessConfig.from_json(artifacts.manifest["preprocessing"]))
    return np.stack([pre(open_image(p, p.name), p.name) for p in write_images(folder)])


def ort_runner(path: Path) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])  # as the runtime runs it
    return lambda pixels: session.run(None, {"pixel_values": pixels})[0]


def embed_all(run: Runner, pixels: np.ndarray, batch: int = 6) -> np.ndarray:
    return np.concatenate([run(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])


def p50_seconds(runners: dict[str, Runner], pixels: np.ndarray, rounds: int) -> dict[str, float]:
    """Batch-1 p50 of every runner, timed in interleaved rounds."""
    one = pixels[:1]
    times = time_calls([lambda run=run: run(one) for run in runners.values()], min_calls=rounds, min_seconds=0.0)
    return {name: float(np.median(t)) for name, t in zip(runners, times)}


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * b, axis=1).min())


def report(rows: list[dict], args: argparse.Namespace) -> None:
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rounds": args.rounds, "rows": rows}, indent=1) + "\n")
