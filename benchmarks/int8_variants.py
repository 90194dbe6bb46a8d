"""Compare int8 quantisation variants of the vision tower against its fp32 graph, in one process.

    python benchmarks/int8_variants.py ARTIFACTS_DIR [--variants a,b] [--rounds 6] [--json OUT]

Builds each variant from ARTIFACTS_DIR/vision.fp32.onnx into a temp dir, then times every session
round-robin (one batch-1 call each per round), so this VM's slow drifts in speed hit all variants
alike. Accuracy: image-embedding cosine vs ONNX Runtime fp32 on the 18 built-in verify images
(runtime preprocessing). A variant is only a candidate; `pickscore verify` against the PyTorch
reference decides whether it ships.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from pickscore_export import onnx_export
from pickscore_export.samples import write_images
from pickscore_runtime.artifacts import Artifacts
from pickscore_runtime.images import open_image
from pickscore_runtime.preprocess import PreprocessConfig, Preprocessor


def _quantize(per_channel: bool = False, const_b_only: bool = True):
    def build(src: Path, dst: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), op_types_to_quantize=onnx_export.INT8_OPS, per_channel=per_channel,
                         weight_type=QuantType.QInt8, use_external_data_format=False,
                         extra_options={"MatMulConstBOnly": const_b_only})
    return build


VARIANTS = {
    "per-tensor": _quantize(),  # what export ships (onnx_export.quantize_int8)
    "per-channel": _quantize(per_channel=True),
    "per-tensor+attention-matmuls": _quantize(const_b_only=False),
}


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    artifacts = Artifacts.load(args.artifacts, hash_check="size")
    fp32 = artifacts.tower_file("vision", "fp32")
    pre = Preprocessor(PreprocessConfig.from_json(artifacts.manifest["preprocessing"]))
    with tempfile.TemporaryDirectory(prefix="int8-variants-") as tmp:
        pixels = np.stack([pre(open_image(p, p.name), p.name) for p in write_images(Path(tmp) / "images")])
        sessions = {"fp32": session(fp32)}
        for name in args.variants.split(","):
            t0 = time.perf_counter()
            VARIANTS[name](fp32, Path(tmp) / f"{name}.onnx")
            print(f"built {name} in {time.perf_counter() - t0:.0f} s", flush=True)
            sessions[name] = session(Path(tmp) / f"{name}.onnx")
        embeds = {name: np.concatenate([s.run(None, {"pixel_values": pixels[i:i + 6]})[0] for i in range(0, len(pixels), 6)])
                  for name, s in sessions.items()}
        one = pixels[:1]
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(args.rounds):
            for name, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, {"pixel_values": one})
                times[name].append(time.perf_counter() - t0)
    rows = []
    for name in sessions:
        cos = np.sum(embeds[name] * embeds["fp32"], axis=1)
        rows.append({"variant": name, "p50_s": round(float(np.median(times[name])), 4),
                     "speedup_vs_fp32": round(float(np.median(times["fp32"]) / np.median(times[name])), 3),
                     "min_cosine_vs_fp32": round(float(cos.min()), 6), "mean_cosine_vs_fp32": round(float(cos.mean()), 6),
                     "max_abs_embed_diff": round(float(np.abs(embeds[name] - embeds["fp32"]).max()), 5)})
        print(json.dumps(rows[-1]), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rounds": args.rounds, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
