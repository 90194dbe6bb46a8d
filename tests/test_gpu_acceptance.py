"""benchmarks/gpu/acceptance.py: its CPU-only mode for real, the commands it plans (each parsed by the
real CLI), its time budget with real subprocesses, and how it reads targets. On a GPU machine the
command itself is the test."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pickscore_runtime.backends import BACKENDS
from pickscore_runtime.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
GPU_USABLE = any(BACKENDS[b].unavailable() is None for b in ("tensorrt", "onnx-cuda", "torch-cuda"))


def load_acceptance():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", REPO / "benchmarks" / "gpu" / "acceptance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(GPU_USABLE, reason="a GPU backend can run here: the acceptance runs for real (minutes)")
@pytest.mark.parametrize("entry", ["acceptance.py", "acceptance.sh"])
def test_on_a_cpu_only_machine_there_is_nothing_to_do_on_gpu(tmp_path, entry):
    script = REPO / "benchmarks" / "gpu" / entry
    argv = [sys.executable, str(script)] if entry.endswith(".py") else ["bash", str(script)]
    out = subprocess.run([*argv, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "nothing to do on GPU" in out.stdout
    report = json.loads((tmp_path / "acceptance.json").read_text())
    assert report["mode"] == "nothing to do on GPU" and report["passed"] is True and report["steps"] == []
    assert report["gpu"] is None
    assert {s["what"] for s in report["skipped"]} == {"tensorrt", "onnx-cuda", "torch-cuda"}
    assert all(s["why"] for s in report["skipped"])
    why = {s["what"]: s["why"] for s in report["skipped"]}
    assert "CUDAExecutionProvider" in why["onnx-cuda"] and "[gpu]" in why["onnx-cuda"]
    for name, s in why.items():
        assert s in out.stdout  # said, not only written


def plan_everything(tmp_path: Path, reuse: bool = False):
    acceptance = load_acceptance()
    args = argparse.Namespace(model=str(tmp_path / "model"), trained=False, workdir=tmp_path / "work")
    steps, skipped = acceptance.plan(args, ["tensorrt", "onnx-cuda", "torch-cuda"], tmp_path / "out", reference_device=True,
                                     reuse=reuse, have_pytest=True, have_matplotlib=False)
    return acceptance, steps, skipped


def test_without_a_cuda_torch_the_plan_drops_what_needs_one(tmp_path):
    """A GPU box whose torch is CPU-only still runs the engines' checks: the reference stays on the CPU and
    the tensors-in stages (torch tensors on the GPU) are skipped with a reason, instead of failing the run."""
    acceptance = load_acceptance()
    args = argparse.Namespace(model=str(tmp_path / "model"), trained=False, workdir=tmp_path / "work")
    steps, skipped = acceptance.plan(args, ["tensorrt", "onnx-cuda"], tmp_path / "out", reference_device=True,
                                     reuse=False, have_pytest=True, have_matplotlib=False)
    argvs = {s.name: s.argv for s in steps}
    assert all("--reference-device" not in argv for name, argv in argvs.items() if name.startswith("verify"))
    stages = argvs["bench"][argvs["bench"].index("--stages") + 1]
    assert "tensors" not in stages and "vision" in stages
    assert {"fp32 reference on the GPU", "tensors-in scoring (tensors-exact, tensors-fast)"} <= {s["what"] for s in skipped}


def test_every_planned_command_is_one_the_cli_accepts(tmp_path):
    acceptance, steps, skipped = plan_everything(tmp_path)
    assert [s.name for s in steps] == ["gpu-tests", "export", "engines", "verify-tensorrt", "verify-onnx-cuda",
                                       "verify-torch-cuda", "bench"]
    parser = build_parser()
    for step in steps:
        if step.argv[1:3] != ["-m", "pickscore_runtime.cli"]:
            continue
        argv = list(step.argv[3:])
        if argv[0] == "verify" and "--reference-device" in argv:  # used only when verify offers it
            i = argv.index("--reference-device")
            argv = argv[:i] + argv[i + 2:]
        args = parser.parse_args(argv)  # exits (fails the test) on a flag the CLI does not have
        if args.command == "bench":
            assert [tuple(b) for b in args.backends] == [("tensorrt", "fp16"), ("onnx-cuda", "fp16"), ("torch-cuda", "fp16"),
                                                         ("torch-cuda", "fp32")]
            assert max(args.batch_sizes) == 256 and set(args.stages) == {"vision", "text", "e2e", "e2e-png", "tensors-exact", "tensors-fast"}
        if args.command == "engine":
            assert (args.precision, args.max_batch, args.opt_batch) == ("fp16", 256, 128)
        if args.command == "export":
            assert args.random_init and args.precision == ["fp32", "fp16"]
    assert {s["what"] for s in skipped} == {"bench plot"}
    assert [s.name for s in plan_everything(tmp_path, reuse=True)[1]][:2] == ["gpu-tests", "engines"]


def processes_named(marker: str) -> list[int]:
    """Live processes whose command line carries `marker` (a zombie is dead: it only waits to be reaped)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state not in ("Z", "X"):
                    found.append(int(proc.name))
        except (OSError, ValueError, IndexError):  # not a process, or gone while we looked
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux's /proc to find the step's processes")
def test_the_budget_stops_a_step_at_its_share_and_skips_what_depends_on_it(tmp_path):
    """A step that would never end on its own is stopped at its cap, with its whole process group (a grandchild
    that would keep the GPU included); what depends on it is skipped, the rest runs. No duration is asserted:
    the stuck step can only end by being stopped, and the steps that must finish get caps no slow machine
    reaches."""
    acceptance = load_acceptance()
    py = sys.executable
    marker = f"pickscore-acceptance-test-{uuid.uuid4().hex}"
    finished = tmp_path / "finished"
    stuck = ["bash", "-c", f'(exec -a {marker} sleep 3600) & wait; touch "{finished}"']  # finishes only if waited for
    steps = [
        acceptance.Step("engines", stuck, cap_s=2),
        acceptance.Step("verify-tensorrt", [py, "-c", "pass"], cap_s=300, after="engines"),
        acceptance.Step("verify-onnx-cuda", [py, "-c", "import sys; print('FAILED: too far'); sys.exit(1)"], cap_s=300),
        acceptance.Step("bench", [py, "-c", "import sys; print(sys.argv[1:])", "--backends", "tensorrt:fp16,onnx-cuda:fp16"],
                        cap_s=300, drop_unless={"engines": ["tensorrt:fp16"]}),
    ]
    said: list[str] = []
    try:
        results = acceptance.run_steps(steps, acceptance.Budget(3600), tmp_path, said.append)
        assert [(r.name, r.status) for r in results] == [("engines", "timeout"), ("verify-tensorrt", "skipped"),
                                                          ("verify-onnx-cuda", "failed"), ("bench", "ok")]
        assert not finished.exists()  # stopped, not waited for
        for _ in range(300):  # SIGKILL went to the whole group; the kernel finishes the grandchild in its own time
            if not processes_named(marker):
                break
            time.sleep(0.1)
        assert processes_named(marker) == []  # no process of the stopped step outlives it
    finally:
        for pid in processes_named(marker):  # only if the test failed: the grandchild this test started
            os.kill(pid, signal.SIGKILL)
    assert results[1].why == "engines did not succeed" and "FAILED: too far" in results[2].why
    assert "['--backends', 'onnx-cuda:fp16']" in (tmp_path / "bench.log").read_text()  # benched without TensorRT
    assert any("engines: timeout" in line for line in said)


def test_targets_are_judged_on_an_h100_only():
    acceptance = load_acceptance()
    rows = [{"backend": b, "precision": "fp16", "stage": "vision", "batch_size": n, "items_per_s": v}
            for b, n, v in [("tensorrt", 64, 1900.0), ("tensorrt", 128, 2300.0), ("tensorrt", 256, 2250.0),
                            ("torch-cuda", 128, 1500.0), ("torch-cuda", 256, 1600.0)]]
    failed_cell = {"backend": "tensorrt", "precision": "fp16", "stage": "vision", "batch_size": 512, "items_per_s": None,
                   "error": "RuntimeError: CUDA out of memory"}  # an error row: no figure, not a candidate
    h100 = acceptance.targets({"rows": rows + [failed_cell]}, {"name": "NVIDIA H100 80GB HBM3"})
    assert [(t["batch"], t["met"]) for t in h100] == [(128, True), (128, True)]
    assert acceptance.bench_errors({"rows": rows + [failed_cell]}) == [
        "tensorrt/fp16 vision batch 512: RuntimeError: CUDA out of memory"]
    assert h100[1]["measured"] == pytest.approx(2300 / 1500)
    slow = [dict(r, items_per_s=r["items_per_s"] / 2) if r["backend"] == "tensorrt" else r for r in rows]
    assert [t["met"] for t in acceptance.targets({"rows": slow}, {"name": "NVIDIA H100 PCIe"})] == [False, False]
    other = acceptance.targets({"rows": rows}, {"name": "NVIDIA A10G"})
    assert [t["met"] for t in other] == [None, None] and "information only" in other[0]["note"]
    assert acceptance.targets(None, {})[0]["status"] == "not measured"


def test_the_summary_reads_what_the_steps_wrote(tmp_path):
    acceptance = load_acceptance()
    (tmp_path / "verify-onnx-cuda.json").write_text(json.dumps([
        {"backend": "onnx-cuda", "precision": "fp16", "passed": True, "failures": [], "max_abs_score_diff": 0.012,
         "max_abs_prob_diff": 0.001, "min_cosine_image": 0.99991, "min_cosine_text": 0.99995},
        {"backend": "onnx-cuda", "precision": "fp32", "passed": False, "failures": ["max |Δscore| 0.2 > 0.001"]}]))
    (tmp_path / "bench.md").write_text("| backend | ... |\n")
    verify = acceptance.verify_summary(tmp_path, ["onnx-cuda", "torch-cuda"])
    assert [(v["precision"], v["passed"]) for v in verify] == [("fp16", True), ("fp32", False)]
    report = {"gpu": {"name": "NVIDIA H100 80GB HBM3"}, "started_utc": "now", "seconds": 500.0, "budget_s": 570,
              "random_weights": True, "steps": [{"name": "bench", "status": "ok", "seconds": 100.0, "why": ""}],
              "skipped": [{"what": "tensorrt", "why": "tensorrt not installed"}], "verify": verify,
              "reference_device": "cuda (TF32 off)", "targets": acceptance.targets(None, {}),
              "bench_errors": ["torch-cuda/fp32 vision batch 256: RuntimeError: CUDA out of memory"]}
    text = acceptance.markdown(report, tmp_path)
    assert "- torch-cuda/fp32 vision batch 256: RuntimeError: CUDA out of memory" in text
    assert "| onnx-cuda | fp16 | True | 0.012 | 0.001 | 0.999910 / 0.999950 |" in text
    assert "| onnx-cuda | fp32 | False | - | - | - / - |" in text and "tensorrt: tensorrt not installed" in text
    assert "| backend | ... |" in text and "RANDOM WEIGHTS" in text
