"""Compare int8 quantisation variants of the vision tower against its fp32 graph, in one process.

    python benchmarks/experiments/int8_variants.py ARTIFACTS_DIR [--variants a,b] [--rounds 6] [--json OUT]

Builds each variant from ARTIFACTS_DIR's fp32 vision tower into a temp dir, then times every session
in interleaved rounds; accuracy is image-embedding agreement with ONNX Runtime fp32
(vision_candidates.py has the shared method).
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from pickscore_export import onnx_export
from pickscore_runtime.artifacts import Artifacts

from vision_candidates import embed_all, ort_candidate, p50_seconds, parse_args, report, verify_pixels

VARIANTS = {
    "per-tensor": onnx_export.quantize_int8,  # what export ships
    "per-channel": partial(onnx_export.quantize_int8, per_channel=True),
    "per-tensor+attention-matmuls": partial(onnx_export.quantize_int8, attention_matmuls=True),
}


def main() -> None:
    args = parse_args(__doc__, lambda ap: ap.add_argument("--variants", default=",".join(VARIANTS)))
    artifacts = Artifacts.load(args.artifacts, hash_check="size")
    fp32 = artifacts.tower_file("vision", "fp32")
    with tempfile.TemporaryDirectory(prefix="int8-variants-") as tmp:
        pixels = verify_pixels(artifacts, Path(tmp) / "images")
        runners = {"fp32": ort_candidate(fp32, "ort", "fp32")}
        for name in args.variants.split(","):
            t0 = time.perf_counter()
            VARIANTS[name](fp32, Path(tmp) / f"{name}.onnx")
            print(f"built {name} in {time.perf_counter() - t0:.0f} s", flush=True)
            runners[name] = ort_candidate(Path(tmp) / f"{name}.onnx", name, "int8")
        embeds = {name: embed_all(run, pixels) for name, run in runners.items()}
        p50 = p50_seconds(runners, pixels, args.rounds)
    cos = {name: np.sum(e * embeds["fp32"], axis=1) for name, e in embeds.items()}
    report([{"variant": name, "p50_s": round(p50[name], 4), "speedup_vs_fp32": round(p50["fp32"] / p50[name], 3),
             "min_cosine_vs_fp32": round(float(cos[name].min()), 6),
             "mean_cosine_vs_fp32": round(float(cos[name].mean()), 6),
             "max_abs_embed_diff": round(float(np.abs(embeds[name] - embeds["fp32"]).max()), 5)} for name in runners], args)


if __name__ == "__main__":
    main()
