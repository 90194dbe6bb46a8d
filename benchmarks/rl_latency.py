"""What an RL step waits for its reward: the latency of one batch of generations (float NCHW in [0, 1], as
a diffusion pipeline hands them over) scored in process (`PickScoreReward`) and through `pickscore serve`
(`ServerReward`, PNG, lossless), interleaved batch by batch in one run, same backend, precision, threads.

    python benchmarks/rl_latency.py --artifacts DIR [--precision int8] [--images 64] [--size 512] [--batches 3]
        --output benchmarks/results/DATE-MACHINE/rl_latency_full.json

Reported per mode: every batch's seconds, p50 and p99 (with few batches p99 is close to the maximum: the
count is in the output), and img/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from pickscore_runtime import PickScorer, RandomWeightsWarning
from pickscore_runtime.machine import code_version, machine_info
from pickscore_runtime.rewards import PickScoreReward
from pickscore_runtime.server import ServerReward

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_bench import server_process  # noqa: E402 - the same server start-up as the throughput bench


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", required=True, type=Path)
    ap.add_argument("--backend", default="onnx-cpu")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--images", type=int, default=64, help="images per batch (default 64)")
    ap.add_argument("--size", type=int, default=512, help="generations are SIZE x SIZE (default 512)")
    ap.add_argument("--batches", type=int, default=3, help="batches per mode (default 3)")
    ap.add_argument("--conventions", default="flow_grpo")
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--label", default="")
    ap.add_argument("--output", type=Path, required=True)
    return ap.parse_args()


def generations(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 16, size // 16, generator=g)
    images = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (images + 0.03 * torch.rand(images.shape, generator=g)).clamp(0, 1)


def main() -> None:
    args = parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        scorer = PickScorer.load(args.artifacts, backend=args.backend, precision=args.precision, hash_check="size",
                                 batch_size=args.max_batch, threads=args.threads, workers=args.workers)
    server_args = argparse.Namespace(artifacts=args.artifacts, backend=args.backend, max_wait_ms=args.max_wait_ms,
                                     max_batch=args.max_batch, threads=args.threads, workers=args.workers)
    rows = []
    with scorer, server_process(server_args, args.precision) as url:
        modes = {"in-process": PickScoreReward(scorer, args.conventions),
                 "server": ServerReward(url, conventions=args.conventions)}
        prompts = [f"a generated image, prompt {i % 8}" for i in range(args.images)]
        for reward in modes.values():  # warm-up: one small batch each
            reward(generations(2, args.size, seed=0), prompts[:2])
        for b in range(args.batches):
            images = generations(args.images, args.size, seed=1 + b)
            order = list(modes) if b % 2 == 0 else list(modes)[::-1]
            results = {}
            for name in order:
                started = time.perf_counter()
                rewards, info = modes[name](images, prompts)
                seconds = time.perf_counter() - started
                results[name] = rewards
                rows.append({"mode": name, "batch": b, "images": args.images, "seconds": seconds})
                print(f"batch {b} {name:10} {seconds:8.1f} s", file=sys.stderr, flush=True)
            # the same pixels both ways (PNG is lossless): the rewards agree
            rows[-1]["max_abs_diff_vs_other"] = float(np.abs(results["in-process"] - results["server"]).max())
        modes["server"].close()
    summary = []
    for name in ("in-process", "server"):
        secs = [r["seconds"] for r in rows if r["mode"] == name]
        summary.append({"mode": name, "batches": len(secs), "p50_s": float(np.percentile(secs, 50)),
                        "p99_s": float(np.percentile(secs, 99)), "img_s": args.images * len(secs) / sum(secs)})
    result = {"label": args.label, "code": code_version(), "command": shlex.join(sys.argv), "cwd": os.getcwd(),
              "machine": machine_info(args.threads), "artifacts": str(args.artifacts), "backend": args.backend,
              "precision": args.precision, "images_per_batch": args.images, "size": args.size,
              "conventions": args.conventions, "summary": summary, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    for s in summary:
        print(f"{s['mode']:10} p50 {s['p50_s']:.1f} s  p99 {s['p99_s']:.1f} s  {s['img_s']:.2f} img/s  ({s['batches']} batches)")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
