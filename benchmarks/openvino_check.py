"""OpenVINO (fp32 and bf16) against ONNX Runtime fp32 and int8 on the vision tower, in one process,
sessions timed in interleaved rounds (batch 1).

    pip install openvino   # not a project dependency: this only measures whether it would be worth one
    python benchmarks/openvino_check.py ARTIFACTS_DIR [--rounds 6] [--json OUT]

ARTIFACTS_DIR must hold fp32 and int8. Accuracy: image-embedding cosine vs ONNX Runtime fp32 on 8
benchmark images (runtime preprocessing). Runtime-only imports: no torch needed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pickscore_runtime.artifacts import Artifacts
from pickscore_runtime.preprocess import PreprocessConfig, Preprocessor
from pickscore_runtime.samples_light import bench_images


def ort_runner(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda pixels: session.run(None, {"pixel_values": pixels})[0]


def openvino_runner(path: Path, precision: str):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda pixels: np.array(request.infer({0: pixels})[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    artifacts = Artifacts.load(args.artifacts, hash_check="size")
    fp32, int8 = artifacts.tower_file("vision", "fp32"), artifacts.tower_file("vision", "int8")
    pre = Preprocessor(PreprocessConfig.from_json(artifacts.manifest["preprocessing"]))
    pixels = np.stack([pre(img) for img in bench_images(8)])
    runners = {"ort-fp32": ort_runner(fp32), "ort-int8": ort_runner(int8),
               "openvino-fp32": openvino_runner(fp32, "f32"), "openvino-bf16": openvino_runner(fp32, "bf16")}
    embeds = {name: np.concatenate([run(pixels[i:i + 1]) for i in range(len(pixels))]) for name, run in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run(pixels[:1])
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name in runners:
        cos = np.sum(embeds[name] * embeds["ort-fp32"], axis=1)
        rows.append({"engine": name, "p50_s": round(float(np.median(times[name])), 4),
                     "speedup_vs_ort_fp32": round(float(np.median(times["ort-fp32"]) / np.median(times[name])), 3),
                     "min_cosine_vs_ort_fp32": round(float(cos.min()), 6)})
        print(json.dumps(rows[-1]), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rounds": args.rounds, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
