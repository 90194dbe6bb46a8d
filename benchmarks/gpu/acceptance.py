#!/usr/bin/env python3
"""GPU acceptance: one command, run from the repository root on an NVIDIA machine, that proves what can
run there and measures it, within one 600 s call.

    bash benchmarks/gpu/acceptance.sh            # or: python3 benchmarks/gpu/acceptance.py [--out DIR]

It needs nothing but this repository and the machine's own packages: the project need not be installed
(project_path.py puts this checkout's packages on the path when it is not), the model's config and
tokenizer ship in models/ (random weights from that config unless --model names trained ones), nothing
is read from outside the tree and nothing is fetched (HF_HUB_OFFLINE=1). It runs what the machine has
(torch CUDA; + onnxruntime-gpu; + TensorRT) and names what it skips, and why.

Results: the folder --out, else $OUT (where the GPU machine collects up to 8 files), else
benchmarks/results/<UTC date>-<gpu name>/. Nothing else is written into the tree. Four files at most:
  summary.json    rewritten whole (atomically) at the start, after every step and every 15 s while one
                  runs, so a run killed at any moment leaves a valid one: state (running | finished |
                  stopped), passed, failed, the steps with their status, seconds and why, what was skipped
                  and why, nvidia-smi and the driver, package versions, the CUDA smoke's checks, the gpu
                  tests' counts and skip reasons, verify reports, bench targets
  summary.md      the same for people, with the bench table (written with summary.json)
  bench.jsonl     every bench row, one JSON line each, as measured (refreshed with summary.json)
  results.tar.gz  logs/ of every step, nvidia-smi.txt, smoke.json, gpu-tests.xml (junit), bench-*.json/.md,
                  verify-*.json (refreshed with summary.json)
The working files live in --workdir (default: the user cache, pickscore/gpu-acceptance), which also keeps
the exported artifacts for the next run.

Steps (subprocesses with their own time caps inside the budget; a step killed at its cap takes its whole
process group with it):
  cuda-smoke   benchmarks/gpu/cuda_smoke.py: cuda_memory and device_arrays through cuda-bindings with torch
               blocked (copies over two streams with events, graph capture/replay with changing host data,
               CuPy views and stream hand-off), then with torch (DLPack hand-off from an unsynchronised
               producer, requires_grad tensors): the layer the TensorRT backend stands on
  gpu-tests    pytest -m gpu on the test modules with gpu-marked tests (tiny CLIP); every gpu test skipped counts as a failure
  export       the full PickScore architecture: fp32 (+ fp16 where onnx-cuda or TensorRT can run), --no-verify
               (verify below checks what runs); reused from --workdir when already there
  engines      TensorRT engines (fp16, batch 1-256 tuned for 128), where TensorRT is installed
  bench-eager  `pickscore bench`: the `gpu` preset's fp16/bf16 backends without options at its batch sizes
               (1-256), vision (batches kept in flight) and tensors-fast (uint8 generations on the GPU -> scores)
  verify-*     `pickscore verify` of each GPU backend against the fp32 reference on this GPU (TF32 off);
               torch-cuda on its fast path (--backend-option compile=true, cuda_graphs=true)
  bench-compiled the preset's torch-cuda rows with options (torch.compile + CUDA graphs, then torch.compile)
               at batch 128, one backend at a time
cuda-smoke, gpu-tests and export run side by side (GPU and CPU work); the rest in order, each capped so the
ones after it keep some time. Without a usable GPU backend only cuda-smoke runs (it reports "no NVIDIA GPU
usable here"); the run says there is nothing to do on GPU, names each skip and its reason, and exits 0.

Budget: hard 540 s (--budget-s) from the start of this process to the last file written (15 s of it kept
for the wrap-up), inside the GPU machine's 600 s per call. Measured on this project's CPU machine (2 cores,
no GPU): the whole run, nothing to do on GPU, 2 s (tests/test_gpu_acceptance.py runs it from a fresh copy
of the tree and checks it against the budget); the full-size fp32 export it would run on a GPU machine
took 3 min 20 s there (benchmarks/results/2026-12-06-avx2). Estimated for the GPU machine (H200, 16 cores;
not run yet), in seconds: start, probes, nvidia-smi 10; export 120-200 (beside it cuda-smoke ~20 and
gpu-tests ~90); bench-eager 60-90 (two model loads, 20 cells); verify-torch-cuda ~60 + one compile (1-2 min); bench-compiled the
rest, 150-250 (each compile of the vision tower 1-2 min; its rows are written as they come, and a cap
reached is reported as a timeout, the rows so far kept).
Exit 1 when a step fails or times out, every gpu test skipped, a gate fails or a bench cell fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from project_path import REPO, ensure_project  # noqa: E402 - stdlib only; the project is importable after ensure_project()
from acceptance_steps import RUNNING, Budget, Step, StepResult, cli, kill, run_steps  # noqa: E402
from acceptance_report import Report, judge_gpu_tests, judge_smoke, nvidia_smi, packages, packed_results, probe  # noqa: E402
# re-exported: tests/test_gpu_acceptance.py reaches them as acceptance.<name>
from acceptance_report import bench_errors, bench_rows, markdown, pytest_outcome, targets, verify_summary  # noqa: E402,F401

GPU_BACKENDS = ("tensorrt", "onnx-cuda", "torch-cuda")
VERIFY = {"tensorrt": "fp16", "onnx-cuda": "fp16,fp32", "torch-cuda": "fp16"}  # what each is gated in
# torch-cuda is gated on its fast path (the target's row), which also warms inductor's cache for bench-compiled;
# its eager path is gated on the tiny model by the gpu tests
VERIFY_OPTIONS = {"torch-cuda": ("compile=true", "cuda_graphs=true")}
ENGINE_MAX_BATCH, ENGINE_OPT_BATCH = 256, 128
EAGER_STAGES = ("vision", "tensors-fast")
BENCH_PRECISIONS = ("fp16", "bf16")  # fp32 (the model card's code) is the preset's; it does not fit this budget
COMPILED_BATCHES = (128,)  # one compile per backend spec: the batch the targets are judged at
BUDGET_S, WRAP_UP_S = 540.0, 15.0


# ---- the plan ------------------------------------------------------------------------------------------
def available_backends() -> dict[str, str | None]:
    """GPU backend -> None if it can run here, else why not (the registry's probe, and the extra to install)."""
    from pickscore_runtime.backends import BACKENDS

    out = {}
    for name in GPU_BACKENDS:
        info = BACKENDS[name]
        try:
            reason = info.unavailable()
        except Exception as e:  # noqa: BLE001 - a probe that crashes means the backend cannot run
            reason = f"{type(e).__name__}: {e}"
        out[name] = f"{reason} (pip extra [{info.extra}])" if reason and info.extra and "no NVIDIA GPU" not in reason else reason
    return out


def gpu_test_files() -> list[str]:
    """The test modules holding gpu-marked tests (named, not the whole folder: collecting every module would
    import what the GPU machine lacks, such as ray)."""
    return [str(p) for p in sorted((REPO / "tests").glob("test_*.py")) if "mark.gpu" in p.read_text()]


def bench_specs(runnable: list[str]) -> tuple[list[str], list[str]]:
    """The `gpu` preset's specs of the backends that can run here, in its fast precisions: (those without
    options, those with options, the most options first: the CUDA-graph row is the target's)."""
    from pickscore_runtime.bench import PRESETS

    specs = [s for s in PRESETS["gpu"].backends if s.name in runnable and s.precision in BENCH_PRECISIONS]
    with_options = sorted((s for s in specs if s.options), key=lambda s: -len(s.options))
    return [str(s) for s in specs if not s.options], [str(s) for s in with_options]


def export_precisions(runnable: list[str]) -> str:
    """fp32 (the reference's, and what torch-cuda needs beside its weights), and fp16 for the backends that run
    exported towers."""
    return "fp32" if runnable == ["torch-cuda"] else "fp32,fp16"


def plan(args: argparse.Namespace, runnable: list[str], staging: Path, reuse: bool,
         have_pytest: bool) -> tuple[list[Step], list[dict[str, str]]]:
    """The steps to run here, and what is skipped with why."""
    from pickscore_runtime.bench import PRESETS

    preset = PRESETS["gpu"]
    artifacts = str(args.workdir / "artifacts")
    steps = [Step("cuda-smoke", [sys.executable, str(REPO / "benchmarks" / "gpu" / "cuda_smoke.py"), "--json",
                                 str(staging / "smoke.json")], cap_s=120, beside=True,
                  judge=judge_smoke(staging / "smoke.json", skip_is_failure=bool(runnable)))]
    skipped = []
    if not runnable:
        return steps, [{"what": "gpu-tests, export, verify, bench", "why": "no GPU backend can run here"}]
    torch_gpu = "torch-cuda" in runnable
    if have_pytest:
        xml = staging / "gpu-tests.xml"
        steps.append(Step("gpu-tests", [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu",
                                        f"--junitxml={xml}", *gpu_test_files()],
                          cap_s=180, beside=True, judge=judge_gpu_tests(xml)))
    else:
        skipped.append({"what": "gpu-tests", "why": "pytest is not installed (pip install 'pickscore-runtime[test]')"})
    precisions = export_precisions(runnable)
    if reuse:
        skipped.append({"what": "export", "why": f"reused the {precisions} artifacts in {artifacts}"})
    else:
        source = (["--model", args.model] if args.model else []) + ([] if args.trained else ["--random-init"])
        steps.append(Step("export", cli("export", *source, "--out", artifacts, "--precision", precisions, "--no-verify",
                                        "--force"), cap_s=300, beside=True))
    needs = "" if reuse else "export"
    if "tensorrt" in runnable:
        steps.append(Step("engines", cli("engine", "build", "--artifacts", artifacts, "--precision", "fp16",
                                         "--max-batch", str(ENGINE_MAX_BATCH), "--opt-batch", str(ENGINE_OPT_BATCH),
                                         "--hash-check", "size"), cap_s=360, after=needs))
    eager, compiled = bench_specs(runnable)
    trt_specs = [s for s in eager if s.startswith("tensorrt:")]
    stages = [s for s in EAGER_STAGES if torch_gpu or not s.startswith("tensors-")]
    if not torch_gpu:
        skipped.append({"what": "tensors-fast bench stage", "why": "the generations are torch tensors on the GPU; "
                                                                  "torch cannot use the GPU here"})
    skipped.append({"what": "bench stages text, e2e, e2e-png, tensors-exact; fp32 rows",
                    "why": "CPU-bound, covered by tensors-fast, or slow: outside this run's time budget "
                           "(`pickscore bench --preset gpu` runs them)"})

    def bench(name: str, specs: list[str], batches: tuple[int, ...], stages: list[str], cap: float,
              *extra: str) -> Step:
        return Step(name, cli("bench", "--artifacts", artifacts, "--backends", ",".join(specs),
                              "--batch-sizes", ",".join(map(str, batches)), "--stages", ",".join(stages),
                              "--min-calls", str(preset.min_calls), "--min-seconds", str(preset.min_seconds),
                              "--output", str(staging / f"{name}.json"), "--markdown", str(staging / f"{name}.md"), *extra),
                    cap_s=cap, after=needs, drop_unless={"engines": trt_specs} if trt_specs else {})

    if eager:
        steps.append(bench("bench-eager", eager, preset.batch_sizes, stages, 150))
    for backend in runnable:
        argv = cli("verify", "--artifacts", artifacts, "--backend", backend, "--precision", VERIFY[backend],
                   "--output", str(staging / f"verify-{backend}.json"))
        for option in VERIFY_OPTIONS.get(backend, ()):
            argv += ["--backend-option", option]
        argv += ["--reference-device", "cuda"] if torch_gpu else []
        cap = 210 if backend in VERIFY_OPTIONS else 150  # + compiling both towers
        steps.append(Step(f"verify-{backend}", argv, cap_s=cap, after="engines" if backend == "tensorrt" else needs))
    if not torch_gpu:
        skipped.append({"what": "fp32 reference on the GPU", "why": "torch cannot use the GPU here; verify runs it on the CPU"})
    if compiled:
        steps.append(bench("bench-compiled", compiled, COMPILED_BATCHES, ["vision"], 300, "--sequential"))
        skipped.append({"what": "compiled rows at batch sizes other than " + ",".join(map(str, COMPILED_BATCHES)),
                        "why": "one compile per backend spec fits the budget (`pickscore bench --preset gpu` runs them all)"})
    return steps, skipped


def reusable(workdir: Path, key: dict[str, Any]) -> bool:
    try:
        return json.loads((workdir / "artifacts.key.json").read_text()) == key and (workdir / "artifacts" / "manifest.json").is_file()
    except (OSError, ValueError):
        return False


# ---- main ----------------------------------------------------------------------------------------------
class Stopped(Exception):
    """SIGTERM / SIGINT: stop the steps, write what there is, exit."""


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    project = ensure_project()  # before anything of the project is imported
    import pickscore_runtime
    from pickscore_runtime.export_cache import cache_root
    from pickscore_runtime.machine import code_version, gpu_info, machine_info

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default $OUT, else benchmarks/results/<UTC date>-<gpu name>)")
    p.add_argument("--workdir", type=Path, default=cache_root() / "gpu-acceptance",
                   help="working files and the exported artifacts, kept for the next run (default: the user cache)")
    p.add_argument("--model", default=None, help="trained weights (a hub id or folder); default: random weights from "
                                                 "the PickScore config the repository ships (no network)")
    p.add_argument("--random-init", action="store_true", help="with --model: random weights from that model's config")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"hard time budget of the whole run (default {BUDGET_S:.0f})")
    p.add_argument("--no-gpu", action="store_true",
                   help="run as on a machine without a GPU (the report path alone), whatever this one has")
    p.add_argument("--strict-targets", action="store_true", help="exit 1 when an H100/H200 target is missed")
    args = p.parse_args(argv)
    args.trained = args.model is not None and not args.random_init
    say = lambda msg: print(f"[acceptance {time.monotonic() - t0:5.0f} s] {msg}", flush=True)  # noqa: E731

    if args.no_gpu:
        reasons = {b: "--no-gpu: run as on a machine without a GPU" for b in GPU_BACKENDS}
    else:
        reasons = available_backends()
    runnable = [b for b in GPU_BACKENDS if reasons[b] is None]
    gpu = probe(gpu_info) if runnable else None
    name = re.sub(r"[^A-Za-z0-9]+", "-", (gpu or {}).get("name") or "no GPU").strip("-")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks" / "results" / f"{started[:10]}-{name}")
    out.mkdir(parents=True, exist_ok=True)
    staging = args.workdir / "run"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "logs").mkdir(parents=True)
    key = {"model": args.model, "random_init": not args.trained, "precisions": export_precisions(runnable)}
    steps, skipped = plan(args, runnable, staging, reusable(args.workdir, key), importlib.util.find_spec("pytest") is not None)
    skipped = [{"what": b, "why": reasons[b]} for b in GPU_BACKENDS if reasons[b] is not None] + skipped
    report = Report(out, staging, {
        "state": "running", "mode": "gpu" if runnable else "nothing to do on GPU", "passed": None,
        "started_utc": started, "budget_s": args.budget_s, "command": shlex.join([sys.executable, *sys.argv]),
        "cwd": os.getcwd(), "out": str(out), "workdir": str(args.workdir),
        "project": {**project, "module": str(Path(pickscore_runtime.__file__).resolve())}, "code": probe(code_version),
        "machine": probe(machine_info, None), "gpu": gpu, "nvidia_smi": probe(nvidia_smi, staging), "packages": probe(packages),
        "backends": runnable, "skipped": skipped, "random_weights": not args.trained, "model": args.model,
        "steps": [asdict(StepResult(s.name, "pending")) for s in steps]}, t0)
    report.save()
    if runnable:
        say(f"GPU {gpu}; running {', '.join(runnable)}")
    else:
        say("nothing to do on GPU: no GPU backend can run here")
    for s in skipped:
        say(f"  skipped {s['what']}: {s['why']}")

    def stop(signum: int, frame: Any) -> None:
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        results = run_steps(steps, Budget(args.budget_s - WRAP_UP_S - (time.monotonic() - t0)), staging / "logs", say,
                            lambda done: report.save(steps=[asdict(done[s.name]) for s in steps]))
        if any(r.name == "export" and r.status == "ok" for r in results):
            (args.workdir / "artifacts.key.json").write_text(json.dumps(key) + "\n")
        state = "finished"
    except Stopped as e:
        for proc in list(RUNNING.values()):
            kill(proc)
        state = f"stopped ({e})"
    report.data["state"] = state
    report.save(**packed_results(report.data, staging, runnable, gpu, args.strict_targets))
    passed = report.data["passed"] and state == "finished"
    report.save(passed=passed)
    say(f"{'PASSED' if passed else 'FAILED: ' + ', '.join(report.data['failed'] + report.data['targets_missed'] or [state])}"
        f"; {len(list(out.iterdir()))} files in {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
