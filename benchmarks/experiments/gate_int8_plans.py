"""Gate int8 plans at full size without exporting again: for each plan, a copy of ARTIFACTS (files
hard-linked, but the fp32 vision tower copied) whose int8 vision tower is derived again from its fp32 tower with that plan and recorded in
the copy's manifest, then the gate on it (`pickscore verify --precision int8`: the PyTorch reference).

    python benchmarks/experiments/gate_int8_plans.py ARTIFACTS --plans SPEC[,SPEC...] --work DIR --json OUT \
        [--model M] [--random-init [--stress] --seed N]

SPEC: as int8_candidates.py --plans (alpha=0.5/ratio=5/per_channel/reduce_range/...). A fresh
`pickscore export` with the plan in export/onnx_export.INT8_PLAN gives the same int8 file (same fp32
tower, same calibration images): this only saves the fp32 export.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from pickscore_export.onnx_export import INT8_CALIBRATION_IMAGES, quantize_int8
from pickscore_export.samples import calibration_pixels
from pickscore_export.source import ModelSource
from pickscore_export.verify import verify
from pickscore_runtime.artifacts import MANIFEST, file_entry, write_manifest
from pickscore_runtime.preprocess import PreprocessConfig

from int8_candidates import plan_options

GATE_KEYS = ("passed", "failures", "gate_version", "max_abs_score_diff", "mean_abs_score_diff", "max_abs_prob_diff",
             "n_resolved_pairs", "resolved_pair_agreement", "n_close_pairs", "close_pair_agreement",
             "pairwise_order_agreement", "n_decisive_pairs", "decisive_pair_flips", "decisive_top1_agreement",
             "best_of_n_regret_mean", "best_of_n_regret_max", "spearman_mean", "min_cosine_image")


def copy_with_plan(src: Path, dst: Path, spec: str) -> dict:
    """dst: src's files hard-linked, but vision.int8.onnx derived again with the plan and the manifest
    updated to match. Returns what quantize_int8 reported."""
    if dst.exists():
        raise SystemExit(f"{dst} exists: give --work an empty directory")
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name.startswith("vision.fp32"):  # onnx refuses to read external data through a hard link
            shutil.copyfile(f, dst / f.name)
        elif f.name not in ("vision.int8.onnx", MANIFEST, "gate.json") and f.is_file():
            os.link(f, dst / f.name)
    manifest = json.loads((src / MANIFEST).read_text())
    options = plan_options(spec)
    calib = calibration_pixels(PreprocessConfig.from_json(manifest["preprocessing"]), INT8_CALIBRATION_IMAGES)
    summary = quantize_int8(dst / "vision.fp32.onnx", dst / "vision.int8.onnx", calibration=calib, **options) or {}
    variant = manifest["towers"]["vision"]["precisions"]["int8"]
    variant["files"] = [file_entry(dst / "vision.int8.onnx", dst)]
    variant["int8_plan"] = options
    variant["smoothquant"] = summary
    variant["numerics"] = f"int8 plan {spec} (benchmarks/experiments/gate_int8_plans.py)"
    write_manifest(dst, {k: v for k, v in manifest.items() if k not in ("format", "format_version")})
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", type=Path)
    ap.add_argument("--plans", required=True)
    ap.add_argument("--work", type=Path, required=True, help="where the copies go (same filesystem as ARTIFACTS)")
    ap.add_argument("--json", dest="json_out", type=Path, required=True)
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[3] / "shared" / "models" / "pickscore_v1"))
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--stress", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-cache", type=Path, default=None, help="reuse the reference's embeddings across plans")
    args = ap.parse_args()
    source = ModelSource(args.model, random_init=args.random_init, seed=args.seed, stress=args.stress)
    rows = []
    for i, spec in enumerate(args.plans.split(",")):
        t0 = time.perf_counter()
        copy = args.work / f"plan{i}"
        summary = copy_with_plan(args.artifacts, copy, spec)
        report = verify(copy, source, precision="int8", progress=lambda m: None, reference_cache=args.reference_cache)
        rows.append({"plan": spec, **{k: report[k] for k in GATE_KEYS}, "summary": summary,
                     "seconds": round(time.perf_counter() - t0, 1), "report": report})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("summary", "report")}), flush=True)
    args.json_out.write_text(json.dumps({"artifacts": str(args.artifacts), "weights": source.weights_kind, "rows": rows,
                                         "machine": report.get("machine")}, indent=2) + "\n")


if __name__ == "__main__":
    main()
