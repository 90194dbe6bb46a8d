"""The effect of the opt-in fast paths on scores, against the exact path, on the same backend (fp32).

    python benchmarks/experiments/fast_modes_effect.py ARTIFACTS_DIR [--json benchmarks/results/DATE-MACHINE/fast_modes_effect.json]

Images: the 18 built-in verify images, plus 8 generated 1024x1024 JPEGs (what diffusion models write;
the verify set has few images large enough for JPEG draft to act on). Prompts: the 9 verify prompts.
Modes: files with jpeg_draft, with reducing_gap 2 and 3; tensors (the decoded pixels as a uint8 batch)
in `exact` mode (should equal the file path) and in `fast` mode (torch bicubic + antialias). Reported:
max and mean |delta score| over every prompt x image, per image set.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from pickscore_export.samples import PROMPTS, synthetic_image, write_images
from pickscore_runtime import PickScorer, RandomWeightsWarning
from pickscore_runtime.images import open_image
from pickscore_runtime.preprocess import to_rgb

FILE_MODES = {"jpeg-draft": {"jpeg_draft": True}, "reducing-gap-2": {"reducing_gap": 2.0},
              "reducing-gap-3": {"reducing_gap": 3.0}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    warnings.simplefilter("ignore", RandomWeightsWarning)
    with tempfile.TemporaryDirectory(prefix="fast-modes-") as tmp:
        sets = {"verify set": [str(p) for p in write_images(Path(tmp) / "verify")]}
        big = []
        for i in range(8):
            big.append(str(Path(tmp) / f"gen_{i}.jpg"))
            synthetic_image(1024, 1024, seed=4000 + i).save(big[-1], "JPEG", quality=90)
        sets["1024x1024 JPEGs"] = big
        scorers = {"exact": PickScorer.load(args.artifacts, backend="onnx-cpu", precision="fp32", hash_check="size")}
        for mode, options in FILE_MODES.items():
            scorers[mode] = PickScorer.load(args.artifacts, backend="onnx-cpu", precision="fp32", hash_check="size", **options)
        text = scorers["exact"].embed_text(PROMPTS)
        scale = scorers["exact"].assembler.logit_scale_exp
        rows = []
        for set_name, paths in sets.items():
            embs = {mode: s.embed_images(paths) for mode, s in scorers.items()}
            arrays = [np.asarray(to_rgb(open_image(p, p))) for p in paths]
            for mode in ("exact", "fast"):
                embs[f"tensor-{mode}"] = np.concatenate(
                    [scorers["exact"].embed_tensors(torch.from_numpy(a)[None], mode, layout="NHWC") for a in arrays])
            want = scale * (embs["exact"] @ text.T)
            for mode, e in embs.items():
                if mode == "exact":
                    continue
                delta = np.abs(scale * (e @ text.T) - want)
                rows.append({"images": set_name, "mode": mode, "max_abs_score_diff": round(float(delta.max()), 6),
                             "mean_abs_score_diff": round(float(delta.mean()), 6)})
                print(json.dumps(rows[-1]), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"artifacts": args.artifacts, "precision": "fp32", "rows": rows},
                                                  indent=1) + "\n")


if __name__ == "__main__":
    main()
