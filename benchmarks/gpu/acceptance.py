#!/usr/bin/env python3
"""GPU acceptance: one command that proves the GPU paths on any NVIDIA machine, in about 10 minutes.

    benchmarks/gpu/acceptance.sh            # or: python benchmarks/gpu/acceptance.py [--model M] [--budget-s S]

It runs what is installed (torch only; + onnxruntime-gpu; + TensorRT) and names what it skips, and why.
Each step is a subprocess of the public CLI with its own time limit inside the budget:

  gpu-tests  pytest -m gpu tests/test_gpu.py: the tiny CLIP on this GPU (every GPU backend against the
             reference, device arrays bound in place, copy/compute overlap, CUDA graphs, engine records
             and refusals); runs beside the export
  export     the full PickScore architecture, fp32 + fp16 (random weights from the PickScore config the package ships
             unless --model), reused from --workdir when already there
  engines    `pickscore engine build` (TensorRT): fp16, batch 1-256 tuned for 128, timing cache kept
  verify     `pickscore verify` for every available GPU backend against the fp32 reference (on this GPU
             with TF32 off where verify offers --reference-device, else on the CPU: the report says which)
  bench      `pickscore bench` with the `gpu` preset (pickscore_runtime.bench.PRESETS): vision, text, e2e on
             JPEG and PNG folders, tensors in, batch 16-256, TensorRT and onnx-cuda against torch-cuda fp16
             and the fp32 model-card code, with GPU memory per row; a cell that fails (out of memory at a
             large batch) is an error row, and the rest is measured

Results go to benchmarks/results/<UTC date>-<gpu name>/ (acceptance.json with the commit, command and
machine, acceptance.md, bench.json/.md/.png, verify-*.json, logs/). Without a usable NVIDIA GPU it says
there is nothing to do on GPU, writes a small JSON naming what it skipped and why, and exits 0. Exit 1
when a step fails, a gate fails or a bench cell fails. Needs no network (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pickscore_runtime.bench import PRESETS
from pickscore_runtime.machine import code_version, machine_info

REPO = Path(__file__).resolve().parents[2]
GPU_BACKENDS = ("tensorrt", "onnx-cuda", "torch-cuda")
# What each GPU backend is checked in: its GPU precision plan (onnx-cuda also fp32, which must be exact).
VERIFY = {"tensorrt": "fp16", "onnx-cuda": "fp16,fp32", "torch-cuda": "fp16"}
# What is benched: the `gpu` preset of `pickscore bench`, less the backends this machine cannot run.
PRESET = PRESETS["gpu"]
BENCH = {b: [f"{n}:{p}" for n, p in PRESET.backends if n == b] for b in GPU_BACKENDS}
BENCH_BATCHES = ",".join(str(b) for b in PRESET.batch_sizes)
ENGINE_MAX_BATCH, ENGINE_OPT_BATCH = 256, 128
# Targets on one H100 (not results): TensorRT fp16 vision throughput at batch >= 128, and its ratio to
# torch-cuda fp16 at the same batch. The fp16 dense limit is ~2,950 img/s (334.6 GFLOP per image).
TARGET_IMG_S, TARGET_RATIO, TARGET_BATCH = 2000.0, 1.3, 128


@dataclass
class Step:
    name: str
    argv: list[str]
    cap_s: float  # the most this step may take
    after: str = ""  # a step whose success this one needs
    drop_unless: dict[str, list[str]] = field(default_factory=dict)  # step -> --backends to drop if it did not succeed


@dataclass
class StepResult:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float = 0.0
    why: str = ""
    returncode: int | None = None
    log: str = ""


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pickscore_runtime.cli", *args]


def offline_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


# ---- what this machine has --------------------------------------------------------------------------
MODULES = {"tensorrt": ("tensorrt", "cuda"), "onnx-cuda": (), "torch-cuda": ("torch", "transformers")}


def available_backends() -> dict[str, str | None]:
    """GPU backend -> None if it can run here, else every reason why not (the registry's own probe, plus
    the modules its extra would bring)."""
    import importlib.util

    from pickscore_runtime.backends import BACKENDS

    out = {}
    for name in GPU_BACKENDS:
        info = BACKENDS[name]
        try:
            reason = info.unavailable()
        except Exception as e:  # noqa: BLE001 - a probe that crashes means the backend cannot run
            reason = f"{type(e).__name__}: {e}"
        missing = [m for m in MODULES[name] if importlib.util.find_spec(m) is None]
        if reason and missing and not all(m in reason for m in missing):
            reason += f"; {', '.join(missing)} not installed"
        needs_extra = reason and (missing or name == "onnx-cuda")  # not for "no GPU" alone
        out[name] = f"{reason} (pip extra [{info.extra}])" if needs_extra else reason
    return out


def gpu_info() -> dict[str, Any] | None:
    """Name, compute capability and memory of the current GPU, from cuda-python, torch or nvidia-smi."""
    try:
        from pickscore_runtime.cuda_memory import current_device

        d = current_device()
        return {"name": d.name, "compute_capability": d.compute_capability, "memory_gb": round(d.total_memory / 2**30, 1),
                "via": "cuda-python"}
    except Exception:  # noqa: BLE001 - try the next way of asking
        pass
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return {"name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                    "memory_gb": round(p.total_memory / 2**30, 1), "via": "torch"}
    except Exception:  # noqa: BLE001
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            name, cc, mem = [x.strip() for x in out.stdout.splitlines()[0].split(",")]
            return {"name": name, "compute_capability": cc, "memory": mem, "via": "nvidia-smi"}
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-") or "unknown"


def verify_has_reference_device() -> bool:
    out = subprocess.run(cli("verify", "--help"), capture_output=True, text=True, env=offline_env(), timeout=120)
    return "--reference-device" in out.stdout


def reusable_artifacts(path: Path, model: str, random_init: bool) -> bool:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        towers = manifest["towers"]
        source = manifest["model"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    same_model = source.get("path") == str(Path(model).resolve()) if Path(model).is_dir() else source.get("model") == model
    have = all({"fp32", "fp16"} <= set(towers.get(t, {}).get("precisions", {})) for t in ("text", "vision"))
    return have and same_model and bool(manifest["model"].get("random_weights")) == random_init


# ---- the plan ---------------------------------------------------------------------------------------
def plan(args: argparse.Namespace, runnable: list[str], out: Path, reference_device: bool,
         reuse: bool, have_pytest: bool, have_matplotlib: bool) -> tuple[list[Step], list[dict[str, str]]]:
    """The steps to run here, and what is skipped with why."""
    artifacts = str(args.workdir / "artifacts")
    steps, skipped = [], []
    torch_gpu = "torch-cuda" in runnable  # the GPU reference and tensors-in scoring both need a CUDA torch
    if reference_device and not torch_gpu:
        reference_device = False
        skipped.append({"what": "fp32 reference on the GPU", "why": "torch cannot use the GPU here; verify runs it on the CPU"})
    if have_pytest:
        steps.append(Step("gpu-tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                                        str(REPO / "tests" / "test_gpu.py")], cap_s=240))
    else:
        skipped.append({"what": "gpu-tests", "why": "pytest is not installed (pip install 'pickscore-runtime[test]')"})
    if reuse:
        skipped.append({"what": "export", "why": f"reused the fp32 + fp16 artifacts in {artifacts}"})
    else:
        source = ["--model", args.model] + ([] if args.trained else ["--random-init"])
        steps.append(Step("export", cli("export", *source, "--out", artifacts, "--precision", "fp32,fp16", "--force"), cap_s=300))
    if "tensorrt" in runnable:
        steps.append(Step("engines", cli("engine", "build", "--artifacts", artifacts, "--precision", "fp16",
                                         "--max-batch", str(ENGINE_MAX_BATCH), "--opt-batch", str(ENGINE_OPT_BATCH),
                                         "--hash-check", "size"), cap_s=360, after="" if reuse else "export"))
    needs = "" if reuse else "export"
    for backend in runnable:
        report = out / f"verify-{backend}.json"
        argv = cli("verify", "--artifacts", artifacts, "--backend", backend, "--precision", VERIFY[backend],
                   "--output", str(report)) + (["--reference-device", "cuda"] if reference_device else [])
        steps.append(Step(f"verify-{backend}", argv, cap_s=150, after="engines" if backend == "tensorrt" else needs))
    specs = [spec for b in runnable for spec in BENCH[b]]
    if not torch_gpu:
        skipped.append({"what": "tensors-in scoring (tensors-exact, tensors-fast)",
                        "why": "the tensors live on the GPU as torch tensors; torch cannot use the GPU here"})
        skipped.append({"what": "bench baselines (torch-cuda fp16, fp32 model card code)",
                        "why": "torch cannot use the GPU here; the bench has no baseline to compare with"})
    if specs:
        stages = [s for s in PRESET.stages if torch_gpu or not s.startswith("tensors-")]
        bench = cli("bench", "--artifacts", artifacts, "--backends", ",".join(specs), "--batch-sizes", BENCH_BATCHES,
                    "--stages", ",".join(stages), "--e2e-images", str(PRESET.e2e_images), "--min-calls", str(PRESET.min_calls),
                    "--min-seconds", str(PRESET.min_seconds), "--output", str(out / "bench.json"),
                    "--markdown", str(out / "bench.md"))
        if have_matplotlib:
            bench += ["--plot", str(out / "bench.png")]
        else:
            skipped.append({"what": "bench plot", "why": "matplotlib is not installed (pip install 'pickscore-runtime[bench]')"})
        steps.append(Step("bench", bench, cap_s=420, after=needs, drop_unless={"engines": BENCH["tensorrt"]}))
    return steps, skipped


# ---- running it -------------------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def start(step: Step, logs: Path, budget: Budget) -> tuple[subprocess.Popen, Any, float]:
    """Start a step; returns (process, its log file, its deadline)."""
    log = open(logs / f"{step.name}.log", "w")
    log.write("$ " + " ".join(step.argv) + "\n")
    log.flush()
    proc = subprocess.Popen(step.argv, stdout=log, stderr=subprocess.STDOUT, env=offline_env(), cwd=REPO,
                            start_new_session=True)
    return proc, log, time.monotonic() + min(step.cap_s, budget.left())


def finish(step: Step, proc: subprocess.Popen, log: Any, deadline: float, logs: Path) -> StepResult:
    try:
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the step's whole process group: no orphan keeps the GPU
        proc.wait()
        code = None
    log.close()
    path = logs / f"{step.name}.log"
    tail = path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    if code is None:  # engines already built (and the timing cache) are kept: a rerun goes on from there
        return StepResult(step.name, "timeout", log=str(path),
                          why=f"stopped at its share of the time budget; run it alone once, then rerun: {' '.join(step.argv)}")
    return StepResult(step.name, "ok" if code == 0 else "failed", why="" if code == 0 else tail[0][-300:],
                      returncode=code, log=str(path))


def run_steps(steps: list[Step], budget: Budget, logs: Path, say: Any) -> list[StepResult]:
    results: dict[str, StepResult] = {}
    queue = list(steps)

    def timed(step: Step, started: float, result: StepResult) -> StepResult:
        result.seconds = round(time.monotonic() - started, 1)
        say(f"{step.name}: {result.status} in {result.seconds:.0f} s {result.why}")
        return result

    # The tiny-model GPU tests and the export need different resources (GPU, CPU): run them side by side.
    paired = [s for s in queue if s.name in ("gpu-tests", "export")]
    if len(paired) == 2:
        say("gpu-tests and export, side by side")
        running = [(s, time.monotonic(), *start(s, logs, budget)) for s in paired]
        for s, started, proc, log, deadline in running:
            queue.remove(s)
            results[s.name] = timed(s, started, finish(s, proc, log, deadline, logs))
    for i, step in enumerate(queue):
        started = time.monotonic()
        for needed, specs in step.drop_unless.items():  # e.g. no engines: bench the others without TensorRT
            if results.get(needed, StepResult(needed, "ok")).status != "ok":
                step.argv = drop_backends(step.argv, specs)
        if step.after and results.get(step.after, StepResult(step.after, "ok")).status != "ok":
            results[step.name] = timed(step, started, StepResult(step.name, "skipped", why=f"{step.after} did not succeed"))
        elif "--backends" in step.argv and not step.argv[step.argv.index("--backends") + 1]:
            results[step.name] = timed(step, started, StepResult(step.name, "skipped", why="no backend left to bench"))
        elif budget.left() < 30:
            results[step.name] = timed(step, started, StepResult(step.name, "skipped", why="the time budget is spent"))
        else:
            later = sum(min(s.cap_s, 90) for s in queue[i + 1:])  # keep something for the steps after this one
            step.cap_s = min(step.cap_s, max(budget.left() - later, budget.left() * 0.5))
            say(f"{step.name} (up to {step.cap_s:.0f} s): {' '.join(step.argv)}")
            results[step.name] = timed(step, started, finish(step, *start(step, logs, budget), logs))
    return [results[s.name] for s in steps]


def drop_backends(argv: list[str], specs: list[str]) -> list[str]:
    at = argv.index("--backends") + 1
    kept = [b for b in argv[at].split(",") if b and b not in specs]
    return argv[:at] + [",".join(kept)] + argv[at + 1:]


# ---- reading the results ------------------------------------------------------------------------------
def verify_summary(out: Path, runnable: list[str]) -> list[dict[str, Any]]:
    rows = []
    for backend in runnable:
        path = out / f"verify-{backend}.json"
        if not path.is_file():
            continue
        reports = json.loads(path.read_text())
        for r in reports if isinstance(reports, list) else [reports]:
            rows.append({k: r.get(k) for k in ("backend", "precision", "passed", "failures", "max_abs_score_diff",
                                              "max_abs_prob_diff", "min_cosine_image", "min_cosine_text", "reference_device")})
    return rows


def targets(bench: dict[str, Any] | None, gpu: dict[str, Any]) -> list[dict[str, Any]]:
    if not bench:
        return [{"target": "TensorRT fp16 vision", "status": "not measured", "why": "no bench result"}]
    vision = {(r["backend"], r["precision"], r["batch_size"]): r["items_per_s"] for r in bench["rows"]
              if r["stage"] == "vision" and not r.get("error")}
    trt = {b: v for (n, p, b), v in vision.items() if (n, p) == ("tensorrt", "fp16") and b >= TARGET_BATCH}
    if not trt:
        return [{"target": "TensorRT fp16 vision", "status": "not measured", "why": "TensorRT did not run"}]
    batch = max(trt, key=trt.get)
    torch16 = vision.get(("torch-cuda", "fp16", batch))
    applies = "H100" in gpu.get("name", "")
    note = "" if applies else f"targets are for one H100; this is a {gpu.get('name')}: information only"
    out = [{"target": f">= {TARGET_IMG_S:.0f} img/s (TensorRT fp16, vision, batch >= {TARGET_BATCH}, one H100)",
            "measured": trt[batch], "batch": batch, "met": trt[batch] >= TARGET_IMG_S if applies else None, "note": note}]
    ratio = trt[batch] / torch16 if torch16 else None
    out.append({"target": f">= {TARGET_RATIO}x torch-cuda fp16 at the same batch", "measured": ratio, "batch": batch,
                "met": (ratio >= TARGET_RATIO if ratio else None) if applies else None,
                "note": note or ("" if torch16 else "torch-cuda fp16 was not measured")})
    return out


def bench_errors(bench: dict[str, Any] | None) -> list[str]:
    """The bench cells that failed (an error row each), as 'backend/precision stage batch N: error'."""
    return [f"{r['backend']}/{r['precision']} {r['stage']} batch {r['batch_size']}: {r['error']}"
            for r in (bench or {}).get("rows", []) if r.get("error")]


def number(x: Any, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(report: dict[str, Any], out: Path) -> str:
    lines = [f"# GPU acceptance: {report['gpu']['name'] if report['gpu'] else 'no GPU'}", "",
             f"{report['started_utc']}, {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget. "
             + ("RANDOM WEIGHTS: scores are meaningless; speed and numerics gates are real." if report["random_weights"] else ""),
             "", "| step | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['why']} |" for s in report["steps"]]
    lines += ["", "Skipped: " + ("; ".join(f"{s['what']}: {s['why']}" for s in report["skipped"]) or "nothing"), ""]
    if report["verify"]:
        lines += ["| backend | precision | passed | max abs Δscore | max abs Δprob | min cosine image / text |", "|---|---|---|---|---|---|"]
        lines += [f"| {v['backend']} | {v['precision']} | {v['passed']} | {number(v.get('max_abs_score_diff'))} | "
                  f"{number(v.get('max_abs_prob_diff'))} | {number(v.get('min_cosine_image'), '.6f')} / "
                  f"{number(v.get('min_cosine_text'), '.6f')} |" for v in report["verify"]]
        lines.append(f"\nReference: {report['reference_device']}.\n")
    if (out / "bench.md").is_file():
        lines += ["## Bench", "", (out / "bench.md").read_text()]
    if report.get("bench_errors"):
        lines += ["Bench cells that failed:", ""] + [f"- {e}" for e in report["bench_errors"]] + [""]
    lines += ["## Targets (one H100)", ""] + [f"- {t['target']}: {t.get('measured')} (batch {t.get('batch')}), met: "
                                              f"{t.get('met')} {t.get('note', '') or t.get('why', '')}" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from pickscore_runtime.export_cache import cache_root

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="trained weights (hub id or folder); default: random weights from "
                                                 "the PickScore config the package ships (no network)")
    p.add_argument("--workdir", type=Path, default=cache_root() / "gpu-acceptance",
                   help="where the artifacts and engines are kept between runs (default: the user cache)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results/<UTC date>-<gpu name>, or <UTC date>-no-gpu)")
    p.add_argument("--budget-s", type=float, default=570, help="time budget for all steps (default 570: 10 minutes with margin)")
    p.add_argument("--strict-targets", action="store_true", help="exit 1 when an H100 target is missed")
    args = p.parse_args(argv)
    args.trained = args.model is not None
    if args.model is None:
        from pickscore_models import pickscore_v1_dir

        args.model = str(pickscore_v1_dir())
    t0 = time.monotonic()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    say = lambda msg: print(f"[acceptance {time.monotonic() - t0:5.0f} s] {msg}", flush=True)  # noqa: E731

    reasons = available_backends()
    runnable = [b for b in GPU_BACKENDS if reasons[b] is None]
    gpu = gpu_info() if runnable else None
    out = args.out or REPO / "benchmarks" / "results" / f"{started[:10]}-{slug(gpu['name']) if gpu else 'no-gpu'}"
    out.mkdir(parents=True, exist_ok=True)
    skipped = [{"what": b, "why": reasons[b]} for b in GPU_BACKENDS if reasons[b] is not None]
    base = {"started_utc": started, "code": code_version(), "command": shlex.join(sys.argv), "cwd": os.getcwd(),
            "machine": machine_info(None), "gpu": gpu, "budget_s": args.budget_s}
    if not runnable:
        report = {**base, "mode": "nothing to do on GPU", "passed": True, "seconds": round(time.monotonic() - t0, 1),
                  "skipped": skipped, "steps": []}
        (out / "acceptance.json").write_text(json.dumps(report, indent=2) + "\n")
        say("nothing to do on GPU: no GPU backend can run here")
        for s in skipped:
            say(f"  skipped {s['what']}: {s['why']}")
        say(f"wrote {out / 'acceptance.json'}")
        return 0

    import importlib.util

    args.workdir.mkdir(parents=True, exist_ok=True)
    reference_device = verify_has_reference_device()
    reuse = reusable_artifacts(args.workdir / "artifacts", args.model, not args.trained)
    steps, more_skipped = plan(args, runnable, out, reference_device, reuse,
                               importlib.util.find_spec("pytest") is not None, importlib.util.find_spec("matplotlib") is not None)
    skipped += more_skipped
    say(f"GPU {gpu}; running {', '.join(runnable)}; skipping {', '.join(s['what'] for s in skipped) or 'nothing'}")
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    results = run_steps(steps, Budget(args.budget_s), logs, say)
    bench = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else None
    verify = verify_summary(out, runnable)
    report = {**base, "mode": "gpu", "random_weights": not args.trained, "model": args.model,
              "artifacts": str(args.workdir / "artifacts"), "backends": runnable, "skipped": skipped,
              "reference_device": "cuda (TF32 off)" if reference_device else
              "cpu: this verify has no --reference-device, so the fp32 reference ran on the CPU",
              "steps": [asdict(r) for r in results], "verify": verify, "targets": targets(bench, gpu or {}),
              "bench_errors": bench_errors(bench), "seconds": round(time.monotonic() - t0, 1)}
    failed = [r.name for r in results if r.status in ("failed", "timeout")] + \
             [f"verify {v['backend']}/{v['precision']}" for v in verify if not v["passed"]] + \
             [f"bench {e.split(':', 1)[0]}" for e in report["bench_errors"]]
    missed = [t["target"] for t in report["targets"] if t.get("met") is False]
    report["failed"], report["targets_missed"] = failed, missed
    report["passed"] = not failed and not (args.strict_targets and missed)
    (out / "acceptance.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "acceptance.md").write_text(markdown(report, out))
    say(f"{'PASSED' if report['passed'] else 'FAILED: ' + ', '.join(failed + missed)}; results in {out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
