"""Measure the export's GELU reorder (export/onnx_export.reorder_erf_gelu) on a vision tower exported
without it, in one process, sessions timed in interleaved rounds (batch 1).

    python benchmarks/gelu_reorder_check.py OLD_ARTIFACTS_DIR [--rounds 6] [--json OUT]

OLD_ARTIFACTS_DIR: fp32 + int8 artifacts exported before the rewrite existed. Builds the reordered
fp32 graph (sharing the old weights file) and its int8 quantisation in a temp dir; reports speed and
embedding agreement of each against the old graph of the same precision.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pickscore_export.onnx_export import external_data_file, quantize_int8, reorder_erf_gelu
from pickscore_export.samples import write_images
from pickscore_runtime.artifacts import Artifacts
from pickscore_runtime.images import open_image
from pickscore_runtime.preprocess import PreprocessConfig, Preprocessor

from int8_variants import session


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    artifacts = Artifacts.load(args.artifacts, hash_check="size")
    old = {p: artifacts.tower_file("vision", p) for p in ("fp32", "int8")}
    pre = Preprocessor(PreprocessConfig.from_json(artifacts.manifest["preprocessing"]))
    with tempfile.TemporaryDirectory(prefix="gelu-reorder-") as tmp:
        pixels = np.stack([pre(open_image(p, p.name), p.name) for p in write_images(Path(tmp) / "images")])
        new = {"fp32": Path(tmp) / old["fp32"].name, "int8": Path(tmp) / "vision.int8.onnx"}
        shutil.copy(old["fp32"], new["fp32"])
        data = external_data_file(old["fp32"])
        if data:  # a copy: onnx refuses symlinked or hard-linked weights files
            shutil.copy(data, Path(tmp) / data.name)
        print("GELUs reordered:", reorder_erf_gelu(new["fp32"]), flush=True)
        quantize_int8(new["fp32"], new["int8"])
        sessions = {f"{p}-{which}": session(paths[p]) for p in ("fp32", "int8") for which, paths in (("old", old), ("reordered", new))}
        embeds = {k: np.concatenate([s.run(None, {"pixel_values": pixels[i:i + 6]})[0] for i in range(0, len(pixels), 6)])
                  for k, s in sessions.items()}
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for k, s in sessions.items():  # warm-up
            s.run(None, {"pixel_values": pixels[:1]})
        for _ in range(args.rounds):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, {"pixel_values": pixels[:1]})
                times[k].append(time.perf_counter() - t0)
    rows = []
    for p in ("fp32", "int8"):
        a, b = embeds[f"{p}-old"], embeds[f"{p}-reordered"]
        rows.append({"precision": p, "old_p50_s": round(float(np.median(times[f"{p}-old"])), 4),
                     "reordered_p50_s": round(float(np.median(times[f"{p}-reordered"])), 4),
                     "speedup": round(float(np.median(times[f"{p}-old"]) / np.median(times[f"{p}-reordered"])), 3),
                     "min_cosine_old_vs_reordered": round(float(np.sum(a * b, axis=1).min()), 9),
                     "max_abs_embed_diff": float(np.abs(a - b).max())})
        print(json.dumps(rows[-1]), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rounds": args.rounds, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
