"""How much a trainer's JPEG step moves PickScore rewards: the same generations scored losslessly and after
a JPEG round trip at the qualities trainers use (Pillow's default 75: flow_grpo's and verl-omni's remote
clients; 80: DDPO's; 95), with `pickscore_runtime.rewards.jpeg_score_shift`, plus the pixels' PSNR.

    python benchmarks/jpeg_shift.py --artifacts DIR [--precision fp32] [--images 16] [--size 512]
        --output benchmarks/results/DATE-MACHINE/jpeg_shift.json

Scores are in raw PickScore units (flow_grpo's rewards are these / 26). With random or stress weights the
shift says how sensitive that network is, not the real PickScore: run it on your own weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from pathlib import Path

import numpy as np

from pickscore_runtime import PickScorer, RandomWeightsWarning
from pickscore_runtime.machine import code_version, machine_info
from pickscore_runtime.rewards import jpeg_round_trip, jpeg_score_shift

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rl_latency import generations  # noqa: E402 - the same smooth stand-in generations


def psnr(u8: np.ndarray, quality: int) -> float:
    errors = [np.mean((jpeg_round_trip(image, quality).astype(np.float64) - image) ** 2) for image in u8]
    return float(10 * np.log10(255**2 / np.mean(errors)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", required=True, type=Path)
    ap.add_argument("--backend", default="onnx-cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--qualities", default="75,80,95")
    ap.add_argument("--label", default="")
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        scorer = PickScorer.load(args.artifacts, backend=args.backend, precision=args.precision, hash_check="size")
    images = generations(args.images, args.size, seed=7)
    u8 = (images * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    prompts = [f"a generated image, prompt {i % 4}" for i in range(args.images)]
    rows = []
    with scorer:
        for quality in (int(q) for q in args.qualities.split(",")):
            row = dict(jpeg_score_shift(scorer, u8, prompts, quality), psnr_db=psnr(u8, quality))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    result = {"label": args.label, "code": code_version(), "command": shlex.join(sys.argv), "machine": machine_info(None),
              "artifacts": str(args.artifacts), "random_weights": scorer.random_weights, "backend": args.backend,
              "precision": args.precision, "size": args.size, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
