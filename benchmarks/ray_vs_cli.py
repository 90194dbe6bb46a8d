"""`pickscore score --ray` against the plain CLI on the same input and machine (SCALE.md; the per-core cost of
decoding, which sizes a cluster, is benchmarks/experiments/decode_cost.py's).

    # Ray vs the CLI: both commands on the same manifest of 512x512 JPEGs (4 per prompt), in alternating order,
    # at two sizes, so that the fixed costs (process start, model load, Ray planning) and the per-image cost
    # separate: per-image cost = (wall(large) - wall(small)) / (large - small).
    python benchmarks/ray_vs_cli.py compare ARTIFACTS_DIR [--precisions int8,fp32] [--sizes 64,256] [--rounds 3]
                                    --json benchmarks/results/DATE-MACHINE/ray_vs_cli.json

The Ray runs join one local cluster started here with twice as many logical CPUs as cores (one scorer actor
of `cores` threads plus decoding tasks, as the CLI runs `cores` ONNX Runtime threads plus `cores` decoding
threads), so cluster start-up is not counted and both paths oversubscribe the cores. Besides wall time, each
run records the CPU time of every process involved (the CLI, or the Ray driver plus the cluster's raylet,
GCS and workers): on a VM shared with other work, CPU time per image is the steadier measure of overhead.
Target for the full architecture: Ray >= 90 % of the CLI's img/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from pickscore_export.samples import synthetic_image
from pickscore_runtime.artifacts import Artifacts
from pickscore_runtime.machine import code_version, machine_info

IMAGES_PER_PROMPT = 4
DISTINCT_IMAGES = 32  # the manifest cycles over these; decoding costs the same every time
# Logical CPUs of the benchmark's cluster per core: the scorer actor takes `cores` (its ONNX Runtime threads),
# and Ray Data's budget must still fit two decoding tasks beside the reading and writing ones.
CLUSTER_CPUS_PER_CORE = 3


def write_work(folder: Path, n: int, size: int) -> Path:
    images = folder / "images"
    images.mkdir(exist_ok=True)
    paths = []
    for k in range(DISTINCT_IMAGES):
        path = images / f"gen{k:02d}.jpg"
        if not path.exists():
            synthetic_image(size, size, seed=k).save(path, quality=90)
        paths.append(path)
    manifest = folder / f"work_{n}.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"i{i}", "prompt": f"a generated scene number {i // IMAGES_PER_PROMPT}",
                                            "image": str(paths[i % DISTINCT_IMAGES])}) + "\n" for i in range(n)))
    return manifest


def run_once(path: str, artifacts: str, precision: str, manifest: Path, out: Path, address: str | None,
             batch_size: int | None) -> float:
    args = [sys.executable, "-m", "pickscore_runtime.cli", "-q", "score", "--artifacts", artifacts, "--hash-check", "size",
            "--backend", "onnx-cpu", "--precision", precision, "--input", str(manifest)]
    args += ["--batch-size", str(batch_size)] if batch_size else []
    if path == "ray":
        args += ["--ray", "--ray-address", address, "--output", str(out)]
    else:
        args += ["--output", str(out.with_suffix(".parquet"))]
    started = time.perf_counter()
    with CpuMeter() as meter:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        meter.exclude(proc.pid)  # counted exactly, from its rusage, once reaped
        _, err = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{path} run failed ({proc.returncode}): {err[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    out.with_suffix(".parquet").unlink(missing_ok=True)
    return wall, meter.seconds


class CpuMeter:
    """CPU time of this process's descendants while it is open: the CLI (or Ray driver) process and the Ray
    cluster's raylet, GCS and workers, sampled every 0.1 s (workers come and go, and the raylet does not
    account for the ones it reaps). On a VM shared with other work, CPU time per image is much steadier
    than wall time."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, float], tuple[float, float]] = {}  # (pid, start) -> (first, last) CPU s
        self._stop = threading.Event()
        self._excluded: set[int] = set()
        self.peak_rss = 0

    def exclude(self, pid: int) -> None:
        self._excluded.add(pid)

    def _sample(self, first: bool = False) -> None:
        import psutil

        rss = 0
        for p in psutil.Process().children(recursive=True):
            try:
                rss += p.memory_info().rss
                if p.pid in self._excluded:
                    continue
                key, t = (p.pid, p.create_time()), p.cpu_times()
            except psutil.Error:
                continue
            cpu = t.user + t.system
            baseline = cpu if first else 0.0
            self.seen[key] = (self.seen.get(key, (baseline, cpu))[0], cpu)
        self.peak_rss = max(self.peak_rss, rss)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    def __enter__(self) -> "CpuMeter":
        self._sample(first=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._children = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        # The CLI process itself has been reaped by subprocess.run: its own rusage is exact.
        self.reaped = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]) - self._children

    @property
    def seconds(self) -> float:
        live = sum(last - first for (pid, _), (first, last) in self.seen.items() if pid not in self._excluded)
        return live + self.reaped


@contextlib.contextmanager
def local_cluster(prefix: str) -> Iterator[str]:
    """A local Ray cluster with CLUSTER_CPUS_PER_CORE logical CPUs per core, for the benchmark's runs to join;
    yields its address."""
    import ray

    temp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # one actor less beside the work, as a production cluster would run
    ray.init(num_cpus=CLUSTER_CPUS_PER_CORE * (os.cpu_count() or 1), include_dashboard=False, _temp_dir=temp,
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def compare(args: argparse.Namespace) -> dict:
    sizes = [int(x) for x in args.sizes.split(",")]
    cores = os.cpu_count() or 1
    rows = []
    with local_cluster("psbench") as address, tempfile.TemporaryDirectory(prefix="ray-vs-cli-") as tmp:
        manifests = {n: write_work(Path(tmp), n, args.image_size) for n in sizes}
        for round_ in range(args.rounds):
            for precision in args.precisions.split(","):
                for n in sizes:
                    paths = ["cli", "ray"] if round_ % 2 == 0 else ["ray", "cli"]  # drift hits both alike
                    for path in paths:
                        wall, cpu = run_once(path, args.artifacts, precision, manifests[n], Path(tmp) / "out",
                                             address, args.batch_size)
                        rows.append({"round": round_, "path": path, "precision": precision, "images": n,
                                     "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                                     "images_per_s": round(n / wall, 3), "load_average": os.getloadavg()[0]})
                        print(json.dumps(rows[-1]), flush=True)
    return {"code": code_version(), "command": shlex.join(sys.argv), "cwd": os.getcwd(), "machine": machine_info(None),
            "load_average_after": os.getloadavg(), "artifacts": args.artifacts,
            "random_weights": Artifacts.load(args.artifacts, hash_check="size").random_weights,
            "image_size": args.image_size, "ray_cluster_cpus": CLUSTER_CPUS_PER_CORE * cores, "rows": rows,
            "summary": summarise(rows, sizes)}


def summarise(rows: list[dict], sizes: list[int]) -> list[dict]:
    """Per precision and path: the median wall per size, the fixed cost and the per-image cost between the two
    sizes, and Ray's img/s as a fraction of the CLI's (at the largest size, and per image)."""
    small, large = min(sizes), max(sizes)
    out = []
    for precision in dict.fromkeys(r["precision"] for r in rows):
        per_path = {}
        for path in ("cli", "ray"):
            def median(key: str, n: int) -> float:
                return float(np.median([r[key] for r in rows if (r["path"], r["precision"], r["images"]) == (path, precision, n)]))

            wall, cpu = ({n: median(key, n) for n in sizes} for key in ("wall_s", "cpu_s"))
            per_image, cpu_per_image = ((v[large] - v[small]) / (large - small) for v in (wall, cpu))
            per_path[path] = {"median_wall_s": wall, "median_cpu_s": cpu, "per_image_ms": round(1000 * per_image, 3),
                              "cpu_per_image_ms": round(1000 * cpu_per_image, 3),
                              "fixed_s": round(wall[small] - small * per_image, 2),
                              "images_per_s_at_largest": round(large / wall[large], 3)}
        ray_, cli = per_path["ray"], per_path["cli"]
        out.append({"precision": precision, **per_path,
                    "ray_vs_cli_images_per_s_at_largest": round(ray_["images_per_s_at_largest"] / cli["images_per_s_at_largest"], 3),
                    "ray_vs_cli_per_image": round(cli["per_image_ms"] / ray_["per_image_ms"], 3),
                    "ray_overhead_per_image_ms": round(ray_["per_image_ms"] - cli["per_image_ms"], 3),
                    "ray_cpu_overhead_per_image_ms": round(ray_["cpu_per_image_ms"] - cli["cpu_per_image_ms"], 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="Ray vs the CLI on the same manifest")
    c.add_argument("artifacts", help="artifacts directory (full size: the lead's run; tiny: per-row overhead)")
    c.add_argument("--precisions", default="int8,fp32")
    c.add_argument("--sizes", default="64,256", help="two manifest sizes (images)")
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--image-size", type=int, default=512)
    c.add_argument("--batch-size", type=int, default=None)
    c.add_argument("--json", type=Path, required=True, help="the JSON to write, e.g. benchmarks/results/DATE-MACHINE/ray_vs_cli_full.json")
    args = ap.parse_args()
    result = compare(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result.get("summary", result["rows"]), indent=2))


if __name__ == "__main__":
    main()
