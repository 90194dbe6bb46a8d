"""Cost as the work grows: `pickscore score` (the CLI, and `--ray`) on the tiny model at 1k / 10k / 100k rows
(1M for the CLI where it fits): seconds per row and peak RSS, so that anything super-linear in the
bookkeeping (resume, parts, the rank pass, row identity) shows up. The model is tiny on purpose: its
inference costs little, so what is measured is everything around it.

    python benchmarks/growth.py ARTIFACTS_DIR --sizes 1000,10000,100000 [--ray-sizes 1000,10000,100000]
                                --json benchmarks/results/DATE-MACHINE/growth.json

Each size runs twice: a fresh run, then `--resume` over the finished output (nothing left to score: the cost
of reading and checking what is there). Seconds per row are marginal, above a `--baseline` run of a few rows
(process start, model load, Ray planning), as ray_vs_cli.py separates them: (wall(N) - wall(base)) / (N - base).
Peak RSS is the largest sum over the command's process tree (the CLI; or the Ray driver, raylet, GCS and
workers), sampled every 0.1 s. The Ray runs join one local cluster started here after the CLI runs, as
ray_vs_cli.py's do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pickscore_runtime.artifacts import Artifacts
from pickscore_runtime.machine import code_version, machine_info
from ray_vs_cli import CpuMeter, local_cluster, write_work

IMAGE_SIZE = 64  # small JPEGs (4 per prompt, as ray_vs_cli.py writes them): decoding is not what is measured


def command(path: str, artifacts: str, manifest: Path, out: Path, address: str | None, resume: bool) -> list[str]:
    args = [sys.executable, "-m", "pickscore_runtime.cli", "-q", "score", "--artifacts", artifacts, "--hash-check", "size",
            "--backend", "onnx-cpu", "--precision", "fp32", "--input", str(manifest), "--output", str(out)]
    args += ["--ray", "--ray-address", address] if path == "ray" else []
    return args + (["--resume"] if resume else [])


def run_once(args: list[str]) -> dict:
    started = time.perf_counter()
    with CpuMeter() as meter:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        meter.exclude(proc.pid)  # its CPU time counted exactly, from its rusage, once reaped
        _, err = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {err[-1500:]}", "wall_s": round(wall, 3)}
    return {"wall_s": round(wall, 3), "cpu_s": round(meter.seconds, 3), "peak_rss_mb": round(meter.peak_rss / 2**20, 1)}


def count_rows(out: Path) -> int:
    import pyarrow.parquet as pq

    files = sorted(out.rglob("*.parquet")) if out.is_dir() else [out]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def measure(args: argparse.Namespace) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="growth-") as tmp:
        for path, sizes in (("cli", args.sizes), ("ray", args.ray_sizes)):
            if not sizes:
                continue
            # the Ray cluster only for the Ray cells: its idle processes would count in the CLI's peak RSS
            with local_cluster("psgrowth") if path == "ray" else contextlib.nullcontext() as address:
                for n in [args.baseline] + sizes:
                    rows += measure_size(Path(tmp), path, n, args.artifacts, address)
    return {"code": code_version(), "command": shlex.join(sys.argv), "machine": machine_info(None),
            "artifacts": args.artifacts, "random_weights": Artifacts.load(args.artifacts, hash_check="size").random_weights,
            "image_size": IMAGE_SIZE, "baseline_rows": args.baseline, "rows": rows, "summary": summarise(rows, args.baseline)}


def measure_size(work: Path, path: str, n: int, artifacts: str, address: str | None) -> list[dict]:
    """A fresh run of n rows, then --resume over its finished output."""
    manifest = write_work(work, n, IMAGE_SIZE)
    out = work / (f"out_{path}_{n}" + ("" if path == "ray" else ".parquet"))
    rows = []
    for phase, resume in (("fresh", False), ("resume_finished", True)):
        row = {"path": path, "rows": n, "phase": phase, **run_once(command(path, artifacts, manifest, out, address, resume))}
        if "error" not in row:
            row["rows_written"] = count_rows(out)
        row["load_average"] = round(os.getloadavg()[0], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    manifest.unlink()
    return rows


def summarise(rows: list[dict], baseline: int) -> list[dict]:
    """Per path and phase: marginal ms per row at each size above the baseline run, and each size's ratio to
    the smallest size's (1.0 = flat; the issue's bound is within +-20 %), with peak RSS."""
    out = []
    for path, phase in dict.fromkeys((r["path"], r["phase"]) for r in rows):
        cell = {r["rows"]: r for r in rows if (r["path"], r["phase"]) == (path, phase) and "error" not in r}
        if baseline not in cell:
            continue
        base = cell[baseline]["wall_s"]
        per_row = {n: 1000 * (r["wall_s"] - base) / (n - baseline) for n, r in sorted(cell.items()) if n != baseline}
        if not per_row:
            continue
        first = per_row[min(per_row)]
        out.append({"path": path, "phase": phase, "fixed_s": base,
                    "ms_per_row": {n: round(v, 4) for n, v in per_row.items()},
                    "vs_smallest": {n: round(v / first, 3) if first > 0 else None for n, v in per_row.items()},
                    "peak_rss_mb": {n: cell[n]["peak_rss_mb"] for n in sorted(cell)}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", help="a tiny artifacts directory (python -m pickscore_export --tiny ...)")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10000, 100000])
    ap.add_argument("--ray-sizes", type=lambda s: [int(x) for x in s.split(",") if x], default=[])
    ap.add_argument("--baseline", type=int, default=100, help="rows of the run whose wall is the fixed cost")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    result = measure(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
