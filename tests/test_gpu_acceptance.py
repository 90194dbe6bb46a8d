"""benchmarks/gpu/acceptance.py: run for real as the GPU machine runs it (a fresh copy of the tree, the project
not installed, nothing beside the tree, $OUT set), here with nothing to do on GPU; the commands it plans
(each parsed by the real CLI); its steps side by side and under the budget, with real subprocesses; how it
judges gpu tests that all skipped; a summary that stays valid when the run is killed; and how it reads
targets. On a GPU machine the command itself is the test."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from pickscore_runtime.backends import BACKENDS
from pickscore_runtime.bench import parse_backend_specs
from pickscore_runtime.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
GPU_USABLE = any(BACKENDS[b].unavailable() is None for b in ("tensorrt", "onnx-cuda", "torch-cuda"))
ACCEPTANCE = REPO / "benchmarks" / "gpu" / "acceptance.py"


def load_acceptance():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", ACCEPTANCE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


# ---- the whole command, from a fresh copy of the tree, not installed ---------------------------------------
@pytest.fixture(scope="module")
def fresh_tree(tmp_path_factory) -> Path:
    """The working tree as a clone would have it plus this checkout's uncommitted work: every file git tracks
    or would track (untracked, not ignored), copied; no .git, no build outputs, and nothing beside it (no
    ../shared)."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    root = tmp_path_factory.mktemp("fresh") / "repo"
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():  # a tracked file deleted in the working tree is not part of it
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    assert not (root.parent / "shared").exists()
    return root


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A Python that imports this environment's packages (numpy, onnxruntime, torch, ...) but not the project:
    a venv whose one .pth file names this environment's site-packages folders as plain paths, so their .pth
    files (the editable install's finder among them) are never run."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                         text=True, check=True).stdout.strip()
    Path(own, "packages-only.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    check = subprocess.run([str(python), "-c", "import numpy, onnxruntime, pickscore_runtime"], capture_output=True, text=True)
    assert "No module named 'pickscore_runtime'" in check.stderr, check.stderr  # really not installed
    subprocess.run([str(python), "-c", "import numpy, onnxruntime, PIL, tokenizers"], check=True)
    return python


def tree_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.parametrize("entry", ["acceptance.py", "acceptance.sh"])
def test_from_a_fresh_tree_not_installed_with_OUT_set_there_is_nothing_to_do_on_gpu(fresh_tree, bare_python, tmp_path, entry):
    script = fresh_tree / "benchmarks" / "gpu" / entry
    argv = [str(bare_python), str(script)] if entry.endswith(".py") else ["bash", str(script)]
    argv += ["--no-gpu"] if GPU_USABLE else []  # a GPU machine would run the real thing (minutes)
    out = tmp_path / "out"
    before = tree_files(fresh_tree)
    t0 = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": str(bare_python), "HOME": str(tmp_path), "OUT": str(out)})
    wall = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "nothing to do on GPU" in done.stdout
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 1 <= len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files), files
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["mode"], summary["state"], summary["passed"]) == ("nothing to do on GPU", "finished", True)
    assert wall <= summary["budget_s"] <= 540 and summary["seconds"] <= summary["budget_s"]
    # the project came from this tree through the path shim, not from an installation
    assert summary["project"]["how"] == "path shim"
    assert Path(summary["project"]["module"]).is_relative_to(fresh_tree.resolve())
    why = {s["what"]: s["why"] for s in summary["skipped"]}
    assert {"tensorrt", "onnx-cuda", "torch-cuda"} <= set(why) and all(why.values())
    for reason in why.values():
        assert reason in done.stdout  # said, not only written
    (smoke,) = summary["steps"]
    assert smoke["name"] == "cuda-smoke" and smoke["status"] == "skipped"
    if not GPU_USABLE:
        assert "no NVIDIA GPU usable here" in smoke["why"]
        assert "CUDAExecutionProvider" in why["onnx-cuda"] and "[gpu]" in why["onnx-cuda"]
    assert summary["packages"]["numpy"] and summary["nvidia_smi"]["found"] is (shutil.which("nvidia-smi") is not None)
    with tarfile.open(out / "results.tar.gz") as tar:
        assert {"logs/cuda-smoke.log", "smoke.json"} <= set(tar.getnames())
    assert tree_files(fresh_tree) == before  # nothing written into the tree


# ---- the plan -----------------------------------------------------------------------------------------
def plan_everything(tmp_path: Path, runnable=("tensorrt", "onnx-cuda", "torch-cuda"), reuse: bool = False):
    acceptance = load_acceptance()
    args = argparse.Namespace(model=None, trained=False, workdir=tmp_path / "work")
    steps, skipped = acceptance.plan(args, list(runnable), tmp_path / "run", reuse=reuse, have_pytest=True)
    return acceptance, steps, skipped


def test_every_planned_command_is_one_the_cli_accepts(tmp_path):
    acceptance, steps, skipped = plan_everything(tmp_path)
    assert [s.name for s in steps] == ["cuda-smoke", "gpu-tests", "export", "engines", "bench-eager", "verify-tensorrt",
                                       "verify-onnx-cuda", "verify-torch-cuda", "bench-compiled"]
    assert [s.name for s in steps if s.beside] == ["cuda-smoke", "gpu-tests", "export"]
    parser = build_parser()
    for step in steps:
        if step.argv[1:3] != ["-m", "pickscore_runtime.cli"]:
            continue
        args = parser.parse_args(step.argv[3:])  # exits (fails the test) on a flag the CLI does not have
        if args.command == "bench":
            given = step.argv[step.argv.index("--backends") + 1]
            assert [str(s) for s in parse_backend_specs(given)] == [str(s) for s in args.backends]
            assert all(str(s) == str(b) for s, b in zip(parse_backend_specs(given), args.backends))
        if step.name == "bench-eager":
            assert given == "tensorrt:fp16,onnx-cuda:fp16,torch-cuda:fp16,torch-cuda:bf16"
            assert args.batch_sizes == [1, 16, 64, 128, 256] and args.stages == ["vision", "tensors-fast"]
        if step.name == "bench-compiled":
            assert given == "torch-cuda:fp16:compile=true,cuda_graphs=true,torch-cuda:fp16:compile=true"
            assert args.batch_sizes == [128] and args.stages == ["vision"] and args.sequential
        if args.command == "engine":
            assert (args.precision, args.max_batch, args.opt_batch) == ("fp16", 256, 128)
        if args.command == "export":
            assert args.random_init and args.precision == ["fp32", "fp16"] and args.no_verify
        if args.command == "verify":
            assert args.reference_device == "cuda"
    # nothing outside the tree or the work folder: no ../shared, no results inside the repository
    for step in steps:
        for arg in step.argv:
            assert "shared" not in arg and not arg.startswith(str(REPO / "benchmarks" / "results")), arg
    assert sum(min(s.cap_s, 300) for s in steps if s.beside) / 3 < 540  # the side-by-side group shares the budget
    assert [s.name for s in plan_everything(tmp_path, reuse=True)[1]][:3] == ["cuda-smoke", "gpu-tests", "engines"]


def test_on_the_gpu_machine_as_it_is_only_torch_cuda_runs_and_fp32_is_exported(tmp_path):
    """Torch CUDA, no TensorRT, no onnxruntime-gpu: no engines, fp32 artifacts only (torch-cuda runs from the
    weights), the GPU reference, and each skip named."""
    acceptance, steps, skipped = plan_everything(tmp_path, runnable=("torch-cuda",))
    argvs = {s.name: s.argv for s in steps}
    assert list(argvs) == ["cuda-smoke", "gpu-tests", "export", "bench-eager", "verify-torch-cuda", "bench-compiled"]
    assert argvs["export"][argvs["export"].index("--precision") + 1] == "fp32"
    assert argvs["bench-eager"][argvs["bench-eager"].index("--backends") + 1] == "torch-cuda:fp16,torch-cuda:bf16"
    assert "--reference-device" in argvs["verify-torch-cuda"]
    assert any("text, e2e" in s["what"] for s in skipped)


def test_without_a_cuda_torch_the_plan_drops_what_needs_one(tmp_path):
    """A GPU box whose torch is CPU-only still runs the engines' checks: the reference stays on the CPU and
    the tensors-in stage (torch tensors on the GPU) is skipped with a reason, instead of failing the run."""
    acceptance, steps, skipped = plan_everything(tmp_path, runnable=("tensorrt", "onnx-cuda"))
    argvs = {s.name: s.argv for s in steps}
    assert all("--reference-device" not in argv for name, argv in argvs.items() if name.startswith("verify"))
    assert argvs["bench-eager"][argvs["bench-eager"].index("--stages") + 1] == "vision"
    assert "bench-compiled" not in argvs
    assert {"fp32 reference on the GPU", "tensors-fast bench stage"} <= {s["what"] for s in skipped}


# ---- running the steps --------------------------------------------------------------------------------
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


def test_the_beside_steps_run_at_the_same_time(tmp_path):
    """Each of the two waits for a file only the other writes: both succeed only if they run together."""
    acceptance = load_acceptance()
    a, b = tmp_path / "a", tmp_path / "b"
    waits = 'touch "{mine}"; for i in $(seq 600); do [ -f "{theirs}" ] && exit 0; sleep 0.05; done; exit 1'
    steps = [acceptance.Step("export", ["bash", "-c", waits.format(mine=a, theirs=b)], cap_s=60, beside=True),
             acceptance.Step("gpu-tests", ["bash", "-c", waits.format(mine=b, theirs=a)], cap_s=60, beside=True)]
    results = acceptance.run_steps(steps, acceptance.Budget(600), tmp_path, lambda line: None)
    assert [r.status for r in results] == ["ok", "ok"]


def test_every_gpu_test_skipped_is_a_failure_with_the_reasons(tmp_path):
    """A real pytest run of gpu-marked tests that all skip (as on a machine whose GPU the tests cannot use)
    exits 0; the acceptance reads its junit report and fails the step, naming the skip reasons."""
    acceptance = load_acceptance()
    tests = tmp_path / "test_fake_gpu.py"
    tests.write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.skip(reason="torch-cuda: no NVIDIA GPU found")
        def test_a(): pass

        @pytest.mark.skip(reason="torch-cuda: no NVIDIA GPU found")
        def test_b(): pass
    """))
    xml = tmp_path / "gpu-tests.xml"
    step = acceptance.Step("gpu-tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.devnull,
                                         f"--junitxml={xml}", str(tests)], cap_s=120, judge=acceptance.judge_gpu_tests(xml))
    (result,) = acceptance.run_steps([step], acceptance.Budget(600), tmp_path, lambda line: None)
    assert result.returncode == 0 and result.status == "failed"
    assert result.why == "every gpu test skipped: torch-cuda: no NVIDIA GPU found (2)"
    assert acceptance.pytest_outcome(xml) == {"passed": 0, "failed": 0, "skipped": 2,
                                              "skip_reasons": {"torch-cuda: no NVIDIA GPU found": 2}}
    tests.write_text(tests.read_text() + "\ndef test_c(): pass\n")
    (result,) = acceptance.run_steps([step], acceptance.Budget(600), tmp_path, lambda line: None)
    assert (result.status, result.why) == ("ok", "1 passed, 2 skipped")


def test_a_run_killed_mid_step_leaves_a_valid_summary_with_the_rows_so_far(tmp_path):
    """The summary is refreshed while a step runs: a bench step that has written one row and then hangs, and
    the acceptance killed (SIGKILL, no clean-up) during it, leave summary.json (valid, state running),
    bench.jsonl with that row and a readable results.tar.gz under OUT, and at most 8 files there."""
    out, staging = tmp_path / "out", tmp_path / "run"
    row = json.dumps({"backend": "torch-cuda", "precision": "fp16", "device": "cuda", "stage": "vision", "batch_size": 128,
                      "items_per_s": 1.0, "p50_ms": 1.0, "p95_ms": 1.0, "peak_rss_mb": 1, "gpu_mem_mb": 1, "error": None,
                      "options": ""})
    driver = textwrap.dedent(f"""
        import importlib.util, sys, time
        from dataclasses import asdict
        from pathlib import Path
        spec = importlib.util.spec_from_file_location("gpu_acceptance", {str(ACCEPTANCE)!r})
        acc = importlib.util.module_from_spec(spec); sys.modules[spec.name] = acc; spec.loader.exec_module(acc)
        import acceptance_steps  # run_steps reads REFRESH_S there; acceptance.py put its folder on sys.path
        acceptance_steps.REFRESH_S = 0.2
        out, staging = Path({str(out)!r}), Path({str(staging)!r})
        out.mkdir(); (staging / "logs").mkdir(parents=True)
        row = {row!r}
        bench = [sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'a'); f.write(sys.argv[2] + chr(10)); "
                 "f.flush(); print('row written', flush=True); time.sleep(3600)", str(staging / "bench-eager.jsonl"), row]
        steps = [acc.Step("bench-eager", bench, cap_s=3600)]
        report = acc.Report(out, staging, {{"state": "running", "started_utc": "now", "budget_s": 540, "skipped": [],
                                            "steps": []}}, time.monotonic())
        acc.run_steps(steps, acc.Budget(3600), staging / "logs", print,
                      lambda done: report.save(steps=[asdict(done[s.name]) for s in steps]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], start_new_session=True)
    try:
        for _ in range(600):
            try:
                if json.loads((out / "summary.json").read_text()).get("bench_rows") == 1:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("the summary never showed the row")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"] == "running" and summary["steps"][0]["status"] == "running"
    assert [json.loads(line)["batch_size"] for line in (out / "bench.jsonl").read_text().splitlines()] == [128]
    with tarfile.open(out / "results.tar.gz") as tar:
        assert "logs/bench-eager.log" in tar.getnames()
    assert len(list(out.iterdir())) <= 8


# ---- reading the results --------------------------------------------------------------------------------
def test_targets_are_judged_on_an_h100_or_h200_only():
    acceptance = load_acceptance()

    def row(backend, batch, value, options="", error=None):
        return {"backend": backend, "precision": "fp16", "stage": "vision", "batch_size": batch, "items_per_s": value,
                "options": options, "error": error}

    rows = [row("tensorrt", 64, 1900.0), row("tensorrt", 128, 2300.0), row("tensorrt", 256, 2250.0),
            row("torch-cuda", 128, 1100.0), row("torch-cuda", 128, 1600.0, "compile=true,cuda_graphs=true"),
            row("tensorrt", 512, None, error="RuntimeError: CUDA out of memory")]  # an error row: not a candidate
    h200 = acceptance.targets(rows, {"name": "NVIDIA H200"})
    assert [(t["measured"], t["batch"], t["met"]) for t in h200] == [(2300.0, 128, True), (1600.0, 128, True)]
    assert h200[1]["options"] == "compile=true,cuda_graphs=true"  # the eager row does not count as compiled
    eager_only = acceptance.targets(rows[:4], {"name": "NVIDIA H100 80GB HBM3"})
    assert eager_only[1]["status"] == "not measured" and eager_only[1]["met"] is None
    slow = [dict(r, items_per_s=r["items_per_s"] / 2) if r["items_per_s"] else r for r in rows]
    assert [t["met"] for t in acceptance.targets(slow, {"name": "NVIDIA H100 PCIe"})] == [False, False]
    other = acceptance.targets(rows, {"name": "NVIDIA A10G"})
    assert [t["met"] for t in other] == [None, None] and "information only" in other[0]["note"]
    assert acceptance.bench_errors(rows) == ["tensorrt/fp16 vision batch 512: RuntimeError: CUDA out of memory"]


def test_the_summary_reads_what_the_steps_wrote(tmp_path):
    acceptance = load_acceptance()
    (tmp_path / "verify-onnx-cuda.json").write_text(json.dumps([
        {"backend": "onnx-cuda", "precision": "fp16", "passed": True, "failures": [], "max_abs_score_diff": 0.012,
         "max_abs_prob_diff": 0.001, "min_cosine_image": 0.99991, "min_cosine_text": 0.99995},
        {"backend": "onnx-cuda", "precision": "fp32", "passed": False, "failures": ["max |Δscore| 0.2 > 0.001"]}]))
    row = {"backend": "torch-cuda", "precision": "fp16", "device": "cuda", "stage": "vision", "batch_size": 128,
           "items_per_s": 1234.5, "p50_ms": 100.0, "p95_ms": 110.0, "peak_rss_mb": 3000, "gpu_mem_mb": 9000, "error": None,
           "options": "compile=true"}
    (tmp_path / "bench-compiled.jsonl").write_text(json.dumps(row) + "\n" + '{"backend": "cut off mid-li')
    rows = acceptance.bench_rows(tmp_path)
    assert rows == [row]  # a line cut off by a kill is left out
    verify = acceptance.verify_summary(tmp_path, ["onnx-cuda", "torch-cuda"])
    assert [(v["precision"], v["passed"]) for v in verify] == [("fp16", True), ("fp32", False)]
    report = {"gpu": {"name": "NVIDIA H200"}, "started_utc": "now", "state": "finished", "mode": "gpu", "seconds": 500.0,
              "budget_s": 540, "passed": False, "random_weights": True,
              "steps": [{"name": "bench-eager", "status": "ok", "seconds": 100.0, "why": ""}],
              "skipped": [{"what": "tensorrt", "why": "tensorrt not installed"}], "verify": verify,
              "targets": acceptance.targets(rows, {"name": "NVIDIA H200"}),
              "bench_errors": ["torch-cuda/fp32 vision batch 256: RuntimeError: CUDA out of memory"],
              "gpu_tests": {"passed": 3, "failed": 0, "skipped": 9, "skip_reasons": {"tensorrt: not installed": 9}}}
    text = acceptance.markdown(report, rows)
    assert "- torch-cuda/fp32 vision batch 256: RuntimeError: CUDA out of memory" in text
    assert "| onnx-cuda | fp16 | True | 0.012 | 0.001 | 0.999910 / 0.999950 |" in text
    assert "| onnx-cuda | fp32 | False | - | - | - / - |" in text and "- tensorrt: tensorrt not installed" in text
    assert "| torch-cuda | fp16 | compile=true | cuda | vision | 128 | 1234.500 |" in text and "RANDOM WEIGHTS" in text
    assert "gpu tests: 3 passed, 0 failed, 9 skipped" in text and "- skipped (9): tensorrt: not installed" in text
