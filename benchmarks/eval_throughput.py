"""Pairs per second of `pickscore eval preference` end to end against `pickscore score` on the same images:
one Pick-a-Pic-format Parquet split (caption, jpg_0, jpg_1 as JPEG bytes, labels) and the same images on disk
with a `score --input` CSV of the same comparisons (prompt, images=[a, b]). Each run is a fresh process
(start-up, model load and report included), the two commands alternate round by round, same artifacts,
backend, precision and threads.

    python benchmarks/eval_throughput.py --artifacts DIR [--precision int8] [--pairs 32] [--size 512] [--rounds 2]
        --output benchmarks/results/DATE-MACHINE/eval_throughput.json
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pickscore_runtime.machine import code_version, machine_info


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", required=True, type=Path)
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--size", type=int, default=512, help="images are SIZE x SIZE JPEGs, quality 95 (default 512)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--label", default="")
    ap.add_argument("--output", type=Path, required=True)
    return ap.parse_args()


def jpeg(seed: int, size: int) -> bytes:
    rng = np.random.default_rng(seed)
    low = rng.random((size // 16, size // 16, 3)) * 255
    image = Image.fromarray(low.astype(np.uint8)).resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_inputs(folder: Path, pairs: int, size: int) -> tuple[Path, Path]:
    rows, work = [], []
    for i in range(pairs):
        caption = f"a generated picture number {i} of a landscape"
        a, b = jpeg(2 * i, size), jpeg(2 * i + 1, size)
        paths = [folder / f"{i:04d}_0.jpg", folder / f"{i:04d}_1.jpg"]
        for p, data in zip(paths, (a, b)):
            p.write_bytes(data)
        rows.append({"caption": caption, "jpg_0": a, "jpg_1": b, "label_0": float(i % 2), "label_1": float(1 - i % 2)})
        work.append({"prompt": caption, "images": json.dumps([str(p) for p in paths]), "group": str(i)})
    split = folder / "test_unique.parquet"
    pq.write_table(pa.Table.from_pylist(rows), split)
    work_csv = folder / "work.csv"
    with open(work_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "images", "group"])
        writer.writeheader()
        writer.writerows(work)
    return split, work_csv


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    args = parse_args()
    pickscore = [sys.executable, "-m", "pickscore_runtime.cli"]
    common = ["--artifacts", str(args.artifacts), "--hash-check", "size", "--precision", args.precision]
    rows = []
    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        folder = Path(tmp)
        split, work_csv = write_inputs(folder, args.pairs, args.size)
        commands = {
            "eval preference": lambda r: pickscore + ["eval", "preference", *common, "--data", str(split),
                                                      "--tie-threshold", "0", "--output", str(folder / f"report{r}.json")],
            "score": lambda r: pickscore + ["score", *common, "--input", str(work_csv),
                                            "--output", str(folder / f"scores{r}.parquet")],
        }
        for r in range(args.rounds):
            order = list(commands) if r % 2 == 0 else list(commands)[::-1]
            for name in order:
                seconds = timed(commands[name](r))
                rows.append({"command": name, "round": r, "pairs": args.pairs, "seconds": seconds,
                             "pairs_per_s": args.pairs / seconds})
                print(f"round {r} {name:16} {seconds:7.1f} s  {args.pairs / seconds:.3f} pairs/s", file=sys.stderr, flush=True)
        report = json.loads((folder / "report0.json").read_text())
    summary = {}
    for name in commands:
        secs = [r["seconds"] for r in rows if r["command"] == name]
        summary[name] = {"median_s": float(np.median(secs)), "pairs_per_s": args.pairs / float(np.median(secs))}
    ratio = summary["eval preference"]["pairs_per_s"] / summary["score"]["pairs_per_s"]
    result = {"label": args.label, "code": code_version(), "command": shlex.join(sys.argv), "cwd": os.getcwd(),
              "machine": machine_info(), "artifacts": str(args.artifacts), "precision": args.precision,
              "pairs": args.pairs, "size": args.size, "summary": summary, "eval_over_score": ratio,
              "eval_n_evaluated": report["n_evaluated"], "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    for name, s in summary.items():
        print(f"{name:16} median {s['median_s']:.1f} s  {s['pairs_per_s']:.3f} pairs/s")
    print(f"eval preference / score: {ratio:.3f}")


if __name__ == "__main__":
    main()
