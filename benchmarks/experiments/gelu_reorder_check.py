"""Measure the export's GELU reorder (export/onnx_export.reorder_erf_gelu) on a vision tower exported
without it, in one process, sessions timed in interleaved rounds (batch 1).

    python benchmarks/experiments/gelu_reorder_check.py OLD_ARTIFACTS_DIR [--rounds 6] [--json OUT]

OLD_ARTIFACTS_DIR: fp32 + int8 artifacts exported before the rewrite existed. Builds the reordered
fp32 graph and its int8 quantisation in a temp dir; reports speed and embedding agreement of each
against the old graph of the same precision.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from pickscore_export.onnx_export import external_data_file, quantize_int8, reorder_erf_gelu
from pickscore_runtime.artifacts import Artifacts

from vision_candidates import embed_all, min_cosine, ort_candidate, p50_seconds, parse_args, report, verify_pixels


def main() -> None:
    args = parse_args(__doc__)
    artifacts = Artifacts.load(args.artifacts, hash_check="size")
    old = {p: artifacts.tower_file("vision", p) for p in ("fp32", "int8")}
    with tempfile.TemporaryDirectory(prefix="gelu-reorder-") as tmp:
        pixels = verify_pixels(artifacts, Path(tmp) / "images")
        new = {"fp32": Path(tmp) / old["fp32"].name, "int8": Path(tmp) / "vision.int8.onnx"}
        shutil.copy(old["fp32"], new["fp32"])
        data = external_data_file(old["fp32"])
        if data:  # a copy: onnx refuses symlinked or hard-linked weights files
            shutil.copy(data, Path(tmp) / data.name)
        print("GELUs reordered:", reorder_erf_gelu(new["fp32"]), flush=True)
        quantize_int8(new["fp32"], new["int8"])
        runners = {f"{p}-{which}": ort_candidate(paths[p], which, p) for p in ("fp32", "int8") for which, paths in (("old", old), ("reordered", new))}
        embeds = {name: embed_all(run, pixels) for name, run in runners.items()}
        p50 = p50_seconds(runners, pixels, args.rounds)
    rows = []
    for p in ("fp32", "int8"):
        before, after = f"{p}-old", f"{p}-reordered"
        rows.append({"precision": p, "old_p50_s": round(p50[before], 4), "reordered_p50_s": round(p50[after], 4),
                     "speedup": round(p50[before] / p50[after], 3),
                     "min_cosine_old_vs_reordered": round(min_cosine(embeds[before], embeds[after]), 9),
                     "max_abs_embed_diff": float(np.abs(embeds[before] - embeds[after]).max())})
    report(rows, args)


if __name__ == "__main__":
    main()
