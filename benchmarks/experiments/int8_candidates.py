"""CPU int8 toward the VNNI limit: candidates for the vision tower, measured against what ships, in one
process, in interleaved rounds.

    python benchmarks/experiments/int8_candidates.py ARTIFACTS_DIR [--only a,b] [--batches 1,4] [--rounds 4] [--calib 32] [--json OUT]

ARTIFACTS_DIR holds the fp32 vision tower (and the shipped dynamic int8). Candidates:
- ort-dynamic:   the artifacts' int8 (since SmoothQuant shipped: smoothed at alpha 0.5, then dynamic)
- ort-plain:     dynamic quantisation of the fp32 graph as before SmoothQuant (activation scales per call)
- ort-smooth:    SmoothQuant (export/smooth.py, alpha per --alphas) folded into the fp32 graph, then
                 dynamic quantisation
- ort-plan:      any quantisation plan quantize_int8 can build (--plans): SmoothQuant, per-token activation
                 scales (export/token_scale.py), per-channel weights, reduced range, layers kept fp32
- ort-static:    static QDQ int8, calibrated (MinMax) on generated images that are not the verify set,
                 per-channel weights, attention's activation x activation matmuls included (needs > 20 GB
                 at full size: ONNX Runtime's calibrator; not runnable on a 24 GB machine)
- ov-static:     OpenVINO running that same QDQ ONNX (its CPU plugin turns Q/DQ pairs into int8 kernels)
- ov-nncf:       OpenVINO int8 from NNCF post-training quantisation of the fp32 model (transformer preset)
- ov-bf16:       OpenVINO bf16 on the fp32 ONNX (AVX512-BF16), for reference
Reported: p50 s/img per batch size, speed-up vs ORT fp32, min/mean cosine vs ORT fp32 on the 18 verify
images, and batch dependence (one image embedded alone vs inside a batch of 4: max |delta embedding|).
The gate (`pickscore verify`) decides what ships; this only says what is worth gating.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from pickscore_export.onnx_export import quantize_int8
from pickscore_export.samples import calibration_pixels
from pickscore_runtime.artifacts import Artifacts

from vision_candidates import (embed_all, min_cosine, openvino_candidate, ort_candidate, p50_seconds, parse_args,
                               preprocessor, report, verify_pixels)

CANDIDATES = ("ort-dynamic", "ort-plain", "ort-smooth", "ort-plan", "ov-nncf", "ov-bf16")


def quantize_static_qdq(fp32: Path, dst: Path, calib: np.ndarray) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.rest = iter([{"pixel_values": calib[i:i + 4]} for i in range(0, len(calib), 4)])

        def get_next(self):
            return next(self.rest, None)

    quantize_static(str(fp32), str(dst), Batches(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                    extra_options={"MatMulConstBOnly": False})


def plan_options(spec: str) -> dict:
    """'alpha=0.5/ratio=5/per_channel/keep=mlp_down/token=layernorm' -> quantize_int8's keyword arguments."""
    options: dict = {"smooth_min_outlier_ratio": 0.0}
    for item in spec.split("/"):
        key, _, value = item.partition("=")
        if key == "alpha":
            options["smooth_alpha"] = float(value)
        elif key == "ratio":
            options["smooth_min_outlier_ratio"] = float(value)
        elif key == "keep":
            options["keep_fp32"] = tuple(value.split("+"))
        elif key == "token":
            options["token_scale"] = value
        elif key == "weights":
            options["weight_type"] = value
        elif key == "roles":  # roles=mlp_up:channel_u8+projection:channel7 (export/onnx_export.WEIGHT_SCHEMES)
            options["role_weights"] = dict(r.split(":", 1) for r in value.split("+"))
        elif key in ("per_channel", "reduce_range") and not value:
            options[key] = True
        else:
            raise SystemExit(f"plan {spec!r}: unknown option {item!r}")
    return options


def quantize_nncf(fp32: Path, calib: np.ndarray):
    import nncf
    import openvino as ov

    model = ov.convert_model(str(fp32))
    dataset = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))])
    return nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))


def main() -> None:
    def extra(ap):
        ap.add_argument("--only", default=",".join(CANDIDATES))
        ap.add_argument("--batches", default="1,4")
        ap.add_argument("--calib", type=int, default=32)
        ap.add_argument("--alphas", default="0.5", help="SmoothQuant alphas (ort-smooth), each as alpha[/min outlier "
                        "ratio[/roles kept fp32, e.g. mlp_down]]")
        ap.add_argument("--plans", default="", help="ort-plan candidates: quantisation plans separated by commas, "
                        "each as /-separated options of quantize_int8: alpha=A (SmoothQuant), ratio=R (its min outlier "
                        "ratio, default 0), keep=ROLE[+ROLE] (kept fp32), token=SCOPE (per-token scales), per_channel, "
                        "reduce_range, weights=int8|uint8, roles=ROLE:SCHEME[+...] (a role's own weight scheme); "
                        "e.g. alpha=0.5/ratio=5/per_channel/reduce_range/token=layernorm")
    args = parse_args(__doc__, extra)
    wanted = args.only.split(",")
    artifacts = Artifacts.load(args.artifacts, hash_check="size")
    fp32 = artifacts.tower_file("vision", "fp32")
    built: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="int8-candidates-") as tmp:
        pixels = verify_pixels(artifacts, Path(tmp) / "images")
        calib = calibration_pixels(preprocessor(artifacts).config, args.calib)
        candidates = {"ort-fp32": ort_candidate(fp32, "ort-fp32", "fp32")}
        if "ort-dynamic" in wanted:
            candidates["ort-dynamic"] = ort_candidate(artifacts.tower_file("vision", "int8"), "ort-dynamic", "int8")
        if "ort-plain" in wanted:
            quantize_int8(fp32, Path(tmp) / "plain.int8.onnx")
            candidates["ort-plain"] = ort_candidate(Path(tmp) / "plain.int8.onnx", "ort-plain", "int8")
        for spec in args.alphas.split(",") if "ort-smooth" in wanted else ():
            alpha, ratio, keep = (spec.split("/") + ["", ""])[:3]
            t0 = time.perf_counter()
            quantize_int8(fp32, Path(tmp) / f"smooth{spec}.int8.onnx".replace("/", "_"), smooth_alpha=float(alpha),
                          calibration=calib, smooth_min_outlier_ratio=float(ratio or 0),
                          keep_fp32=tuple(k for k in keep.split("+") if k))
            built[f"smooth-{spec}"] = round(time.perf_counter() - t0, 1)
            print(f"built SmoothQuant {spec} + dynamic int8 in {built[f'smooth-{spec}']} s", flush=True)
            candidates[f"ort-smooth-{spec}"] = ort_candidate(Path(tmp) / f"smooth{spec}.int8.onnx".replace("/", "_"),
                                                             "ort-smooth", "int8")
        for i, spec in enumerate(p for p in args.plans.split(",") if p and "ort-plan" in wanted):
            t0 = time.perf_counter()
            quantize_int8(fp32, Path(tmp) / f"plan{i}.int8.onnx", calibration=calib, **plan_options(spec))
            built[f"plan-{spec}"] = round(time.perf_counter() - t0, 1)
            print(f"built plan {spec} in {built[f'plan-{spec}']} s", flush=True)
            candidates[f"ort-plan-{spec}"] = ort_candidate(Path(tmp) / f"plan{i}.int8.onnx", "ort-plan", "int8")
        if {"ort-static", "ov-static"} & set(wanted):
            t0 = time.perf_counter()
            quantize_static_qdq(fp32, Path(tmp) / "static.onnx", calib)
            built["static-qdq"] = round(time.perf_counter() - t0, 1)
            print(f"built static QDQ in {built['static-qdq']} s", flush=True)
            if "ort-static" in wanted:
                candidates["ort-static"] = ort_candidate(Path(tmp) / "static.onnx", "ort-static", "int8")
            if "ov-static" in wanted:
                candidates["ov-static"] = openvino_candidate(Path(tmp) / "static.onnx", "ov-static", "int8")
        if "ov-nncf" in wanted:
            t0 = time.perf_counter()
            model = quantize_nncf(fp32, calib)
            built["nncf"] = round(time.perf_counter() - t0, 1)
            print(f"built NNCF int8 in {built['nncf']} s", flush=True)
            candidates["ov-nncf"] = openvino_candidate(model, "ov-nncf", "int8")
        if "ov-bf16" in wanted:
            candidates["ov-bf16"] = openvino_candidate(fp32, "ov-bf16", "bf16", "bf16")
        embeds = {name: embed_all(c, pixels) for name, c in candidates.items()}
        batch_dependence = {name: float(np.abs(c.embed_images(pixels[:1])[0] - c.embed_images(pixels[:4])[0]).max())
                            for name, c in candidates.items()}
        p50 = {b: p50_seconds(candidates, pixels, args.rounds, b) for b in (int(x) for x in args.batches.split(","))}
    rows = []
    for name in candidates:
        cos = np.sum(embeds[name] * embeds["ort-fp32"], axis=1)
        row = {"candidate": name, "min_cosine_vs_ort_fp32": round(float(cos.min()), 6),
               "mean_cosine_vs_ort_fp32": round(float(cos.mean()), 6),
               "max_abs_embed_change_alone_vs_in_batch": batch_dependence[name]}
        for b, per in p50.items():
            row[f"p50_s_per_img_b{b}"] = round(per[name], 4)
            row[f"speedup_vs_ort_fp32_b{b}"] = round(per["ort-fp32"] / per[name], 3)
        rows.append(row)
    report(rows, args, build_seconds=built, calibration_images=args.calib, min_cosine_ort_dynamic=min_cosine(
        embeds.get("ort-dynamic", embeds["ort-fp32"]), embeds["ort-fp32"]))


if __name__ == "__main__":
    main()
