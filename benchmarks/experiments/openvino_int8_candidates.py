"""Issue 22: OpenVINO vision-tower candidates for a CPU path ahead of torch bf16, against the shipped ONNX
Runtime int8, timed in interleaved rounds (batch 1 and 4) with their image-embedding cosine vs ONNX Runtime
fp32 on the built-in verify images. Speed and a proxy only: gate_openvino_int8.py judges with gate v3.

    python benchmarks/experiments/openvino_int8_candidates.py ARTIFACTS CANDIDATE[,CANDIDATE...] [--rounds N] [--json F]

CANDIDATE:
  ort-int8                         the shipped ONNX Runtime int8 tower
  ov-bf16                          the fp32 ONNX, INFERENCE_PRECISION_HINT=bf16
  own-<group>-<hint>-<keep>        the fp32 ONNX, matmul weights int8 per output column at load
                                   (runtime/backends/openvino_weights.py), DYNAMIC_QUANTIZATION_GROUP_SIZE=<group>
                                   (0: off), INFERENCE_PRECISION_HINT=<hint> (bf16 | f32), <keep>: none | fc1
                                   (the MLP up-projections left uncompressed)
  wc-<mode>-<group>-<hint>         the same with NNCF's compress_weights (mode int8_sym | int8_asym; needs nncf)
  ptq-<alpha|none>-<y|n>           NNCF static int8 (ModelType.TRANSFORMER, 18 calibration images of another
                                   seed; y: MLP up-projections and projection ignored), bf16 hint (needs nncf)
--rounds 0 skips the timing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vision_candidates import VisionCandidate, embed_all, min_cosine, ort_candidate, p50_seconds, verify_pixels
from pickscore_runtime.artifacts import Artifacts
from pickscore_runtime.machine import code_version, machine_info

FC1 = (1280, 5120)  # the MLP up-projection's weight, [K, N]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts")
    ap.add_argument("candidates")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()

    import openvino as ov

    art = Artifacts.load(args.artifacts, hash_check="size")
    fp32_path, int8_path = art.tower_file("vision", "fp32"), art.tower_file("vision", "int8")
    core = ov.Core()
    notes: dict[str, dict] = {}

    def compiled(model, name: str, config: dict) -> VisionCandidate:
        t = time.time()
        c = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", **config})
        request = c.create_infer_request()
        kernels: dict[str, int] = {}
        for op in c.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kind = str(info["layerType"].astype(str))
            if kind in ("FullyConnected", "MatMul", "Convolution"):
                key = f"{kind}:{info['runtimePrecision'].astype(str)}"
                kernels[key] = kernels.get(key, 0) + 1
        notes.setdefault(name, {}).update(compile_s=round(time.time() - t, 1), kernels=kernels)
        print(name, notes[name], flush=True)
        return VisionCandidate(name, "candidate", lambda pixels: np.array(request.infer({0: pixels})[0]))

    candidates = {"ort-fp32": ort_candidate(fp32_path, "ort-fp32", "fp32")}
    for name in args.candidates.split(","):
        if name == "ort-int8":
            candidates[name] = ort_candidate(int8_path, name, "int8")
        elif name == "ov-bf16":
            candidates[name] = compiled(core.read_model(str(fp32_path)), name, {"INFERENCE_PRECISION_HINT": "bf16"})
        elif name.startswith("own-"):
            from pickscore_runtime.backends.openvino_weights import compress_matmul_weights

            _, group, hint, keep = name.split("-")
            model = core.read_model(str(fp32_path))
            kept = {"none": (), "fc1": (FC1,)}[keep]
            notes[name] = {"int8_matmuls": compress_matmul_weights(model, keep=lambda shape: shape in kept)}
            candidates[name] = compiled(model, name, {"INFERENCE_PRECISION_HINT": hint,
                                                      "DYNAMIC_QUANTIZATION_GROUP_SIZE": int(group)})
        elif name.startswith("wc-"):
            import nncf

            _, mode, group, hint = name.split("-")
            model = nncf.compress_weights(core.read_model(str(fp32_path)), mode=getattr(nncf.CompressWeightsMode, mode.upper()))
            candidates[name] = compiled(model, name, {"INFERENCE_PRECISION_HINT": hint,
                                                      "DYNAMIC_QUANTIZATION_GROUP_SIZE": int(group)})
        elif name.startswith("ptq-"):
            import nncf

            _, alpha, ignore = name.split("-")
            calibration = verify_pixels(art, Path("/tmp/openvino_int8_candidates_calibration"), seed=1)
            model = core.read_model(str(fp32_path))
            options: dict = {}
            if alpha != "none":
                options["advanced_parameters"] = nncf.AdvancedQuantizationParameters(
                    smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=float(alpha)))
            if ignore == "y":
                names = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"
                         and str(op.input(1).get_partial_shape()) in ("[1280,5120]", "[1280,1024]")]
                options["ignored_scope"] = nncf.IgnoredScope(names=names)
            model = nncf.quantize(model, nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))]),
                                  model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration), **options)
            candidates[name] = compiled(model, name, {"INFERENCE_PRECISION_HINT": "bf16"})
        else:
            raise SystemExit(f"unknown candidate {name!r}")

    pixels = verify_pixels(art, Path("/tmp/openvino_int8_candidates_verify"))
    reference = embed_all(candidates["ort-fp32"], pixels)
    rows = []
    for name, candidate in candidates.items():
        got = embed_all(candidate, pixels)
        rows.append({"candidate": name, **notes.get(name, {}), "min_cosine": min_cosine(reference, got),
                     "mean_cosine": float(np.sum(reference * got, axis=1).mean())})
    for batch in ((1, 4) if args.rounds else ()):
        seconds = p50_seconds(candidates, pixels, args.rounds, batch=batch)
        for row in rows:
            row[f"img_per_s_b{batch}"] = round(1 / seconds[row["candidate"]], 3)
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"artifacts": args.artifacts, "rounds": args.rounds, "machine": machine_info(),
                                                   "code": code_version(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
