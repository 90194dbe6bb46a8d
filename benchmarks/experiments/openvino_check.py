"""OpenVINO (fp32 and bf16) against ONNX Runtime fp32 and int8 on the vision tower, in one process,
timed in interleaved rounds (batch 1).

    pip install openvino   # not a project dependency: this only measures whether it would be worth one
    python benchmarks/experiments/openvino_check.py ARTIFACTS_DIR [--rounds 6] [--json OUT]

ARTIFACTS_DIR must hold fp32 and int8; OpenVINO reads the same fp32 ONNX file. Accuracy: image
embeddings vs ONNX Runtime fp32 (vision_candidates.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pickscore_runtime.artifacts import Artifacts

from vision_candidates import embed_all, min_cosine, openvino_candidate, ort_candidate, p50_seconds, parse_args, report, verify_pixels


def main() -> None:
    args = parse_args(__doc__)
    artifacts = Artifacts.load(args.artifacts, hash_check="size")
    fp32, int8 = artifacts.tower_file("vision", "fp32"), artifacts.tower_file("vision", "int8")
    with tempfile.TemporaryDirectory(prefix="openvino-check-") as tmp:
        pixels = verify_pixels(artifacts, Path(tmp) / "images")
    runners = {"ort-fp32": ort_candidate(fp32, "ort", "fp32"), "ort-int8": ort_candidate(int8, "ort", "int8"),
               "openvino-fp32": openvino_candidate(fp32, "openvino", "fp32", "f32"),
               "openvino-bf16": openvino_candidate(fp32, "openvino", "bf16", "bf16")}
    embeds = {name: embed_all(run, pixels) for name, run in runners.items()}
    p50 = p50_seconds(runners, pixels, args.rounds)
    report([{"engine": name, "p50_s": round(p50[name], 4), "speedup_vs_ort_fp32": round(p50["ort-fp32"] / p50[name], 3),
             "min_cosine_vs_ort_fp32": round(min_cosine(embeds[name], embeds["ort-fp32"]), 6)} for name in runners], args)


if __name__ == "__main__":
    main()
