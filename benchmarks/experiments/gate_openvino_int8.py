"""Issue 22: gate v3 (`pickscore verify`, the PyTorch reference) of OpenVINO int8 variants at full size, each
run through the real openvino backend with its plan changed in-process (activation group, precision hint
for the rest, matmuls left uncompressed), plus the backend's own bf16.

    python benchmarks/experiments/gate_openvino_int8.py ARTIFACTS VARIANT[,VARIANT...] --json F [--reference-cache C]

VARIANT: <group>-<keep>[-<hint>[-text8][-textbf16]] (group: DYNAMIC_QUANTIZATION_GROUP_SIZE; keep: none | fc1;
hint: bf16 (default) | f32, for both towers; text8: the text tower's weights int8 too; textbf16: the text tower
with the bf16 hint), or bf16 / fp32 (the backend's own precisions). What ships is 128-none-f32-textbf16.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import pickscore_runtime.backends.openvino as openvino_backend
from pickscore_export.verify import verify_precisions
from pickscore_runtime.backends import openvino_weights
from pickscore_runtime.machine import code_version

FC1 = (1280, 5120)
KEYS = ("passed", "failures", "runs", "max_abs_score_diff", "mean_abs_score_diff", "max_abs_prob_diff", "n_resolved_pairs",
        "resolved_pair_agreement", "decisive_pair_flips", "decisive_top1_agreement", "best_of_n_regret_max",
        "pairwise_order_agreement", "min_cosine_image", "margins")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts")
    ap.add_argument("variants")
    ap.add_argument("--json", dest="json_out", required=True)
    ap.add_argument("--reference-cache")
    args = ap.parse_args()
    rows, machine = [], None
    for variant in args.variants.split(","):
        precision = variant if variant in ("bf16", "fp32") else "int8"
        if precision == "int8":
            group, keep, *rest = variant.split("-")
            openvino_backend.ACTIVATION_GROUP = int(group)
            hint = rest[0] if rest else "bf16"
            openvino_backend.HINTS["int8"] = {"vision": hint, "text": "bf16" if "textbf16" in rest[1:] else hint}
            openvino_backend.INT8_TOWERS = ("vision", "text") if "text8" in rest[1:] else ("vision",)
            kept = {"none": (), "fc1": (FC1,)}[keep]
            openvino_backend.compress_matmul_weights = functools.partial(openvino_weights.compress_matmul_weights,
                                                                         keep=lambda shape, kept=kept: shape in kept)
        t = time.time()
        (report,) = verify_precisions(args.artifacts, [precision], None, backend="openvino",
                                      reference_cache=args.reference_cache)
        machine = report.get("machine")
        rows.append({"variant": variant, "seconds": round(time.time() - t), **{k: report.get(k) for k in KEYS}})
        print(json.dumps(rows[-1]), flush=True)
        with open(args.json_out, "w") as f:
            json.dump({"artifacts": args.artifacts, "machine": machine, "code": code_version(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
