"""`pickscore bench` on a GPU shared with a trainer: the reward's device memory (weights, workspace per batch)
and `--colocate`, its effect on a stand-in for the trainer's step. No GPU here: `--colocate` is refused up
front (before the model, the artifacts or a backend loads) and that is what the CLI tests; the measuring
(the stand-in's loop in its thread, the windows, the rates, a failing workload) runs with a CPU step in
place of the GPU matmul; the memory arithmetic with a scripted probe. The GPU stand-in itself has never run."""

from __future__ import annotations

import itertools
import re
import json
import time

import pytest

from helpers import load_quietly
from pickscore_runtime import bench, colocated
from pickscore_runtime.artifacts import Artifacts
from pickscore_runtime.backends import BACKENDS, registry
from pickscore_runtime.bench import BenchSpec, bench_inputs, markdown_table, run_bench, time_block, time_calls
from pickscore_runtime.cli import commands, main
from pickscore_runtime.colocated import Workload, WorkloadError, iterations_per_s, slowdown
from pickscore_runtime.errors import PickScoreError


# ---- refused up front without a GPU ----------------------------------------------------------------------
@pytest.fixture
def nothing_may_load(monkeypatch):
    """Whatever the bench would load first fails the test if it is reached."""
    def reached(*args, **kwargs):
        raise AssertionError("the bench loaded something before refusing --colocate")

    monkeypatch.setattr(commands, "export_tools", reached)  # --model / --random-init: the weights
    monkeypatch.setattr(Artifacts, "load", reached)
    monkeypatch.setattr(bench, "open_backend_spec", reached)
    monkeypatch.setattr(colocated, "stand_in_trainer", reached)


def test_colocate_is_refused_before_anything_loads_without_a_gpu(tiny_artifacts, monkeypatch, nothing_may_load, capsys):
    monkeypatch.setattr(registry, "no_nvidia_gpu", lambda: "no NVIDIA GPU found")
    monkeypatch.setattr(colocated, "findable", lambda name: pytest.fail("looked for torch without a GPU"))
    code = main(["bench", "--artifacts", str(tiny_artifacts), "--backends", "torch-cuda:fp16", "--random-init",
                 "--colocate", "--output", str(tiny_artifacts.parent / "never.json")])
    err = capsys.readouterr().err
    assert code == 2  # a usage / setup error: one line, no traceback
    assert "error: bench --colocate" in err and "CUDA build of torch on an NVIDIA GPU: no NVIDIA GPU found" in err
    assert "Traceback" not in err and not (tiny_artifacts.parent / "never.json").exists()


def test_colocate_is_refused_where_torch_cannot_use_the_gpu(tiny_artifacts, monkeypatch, nothing_may_load, tmp_path):
    import torch

    monkeypatch.setattr(registry, "no_nvidia_gpu", lambda: None)  # a device is there ...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # ... but torch cannot use it
    with pytest.raises(PickScoreError, match=re.escape(f"torch {torch.__version__} cannot use the GPU")):
        run_bench(tiny_artifacts, ["onnx-cpu:fp32"], [1], ["text"], colocate=True, output=tmp_path / "b.json")
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "b.jsonl").exists()
    monkeypatch.setattr(colocated, "findable", lambda name: name != "torch")
    assert colocated.colocate_unavailable() == "torch is not installed (install a CUDA build of torch)"


def test_the_flag_is_off_by_default_and_documented_in_help():
    from pickscore_runtime.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["bench", "--artifacts", "d"]).colocate is False
    assert parser.parse_args(["bench", "--artifacts", "d", "--colocate"]).colocate is True


# ---- the arithmetic ----------------------------------------------------------------------------------------
def test_rates_and_slowdown():
    assert iterations_per_s((10, 1.0), (60, 1.5)) == 100.0
    assert iterations_per_s((10, 1.0), (10, 1.0)) is None  # an empty window
    assert slowdown(100.0, 100.0) == 1.0  # untouched
    assert slowdown(100.0, 80.0) == 1.25  # each trainer iteration took a quarter longer
    assert slowdown(100.0, 300.0) == 0.333  # (faster beside it: reported as measured)
    assert slowdown(None, 50.0) is None and slowdown(100.0, None) is None
    assert slowdown(100.0, 0.0) is None  # starved: no iteration finished in its window


def test_time_calls_without_a_warm_up():
    order: list[str] = []
    ticks = itertools.count()
    times = time_calls([lambda: order.append("a")], min_calls=2, min_seconds=0, clocks=[lambda: next(ticks)],
                       warm_up=False)
    assert order == ["a", "a"] and times == [[1, 1]]


# ---- the workload's loop --------------------------------------------------------------------------------
def sleeping_step(seconds: float = 0.002):
    return lambda: time.sleep(seconds)


def test_a_workload_counts_its_iterations_only_while_running():
    entered = []

    class Scope:
        def __enter__(self):
            entered.append("in")

        def __exit__(self, *exc):
            entered.append("out")

    workload = Workload(sleeping_step(), {"what": "sleep"}, context=Scope)
    assert workload.iterations == 0
    with workload.running():
        start = workload.mark()
        assert start[0] >= 1  # it returns once the first iteration is done
        time.sleep(0.1)
        end = workload.mark()
    stopped = workload.iterations
    time.sleep(0.05)
    assert workload.iterations == stopped  # the loop has stopped
    assert end[0] > start[0] and 0 < iterations_per_s(start, end) <= 500  # at most 1 / 2 ms
    assert entered == ["in", "out"]  # its per-thread scope (the CUDA stream) around the loop, in its thread
    assert 0 < workload.alone(0.05) <= 500
    with pytest.raises(RuntimeError, match="already running"), workload.running(), workload.running():
        pass


def test_a_failing_workload_raises_at_the_next_mark():
    calls = itertools.count()

    def step():
        if next(calls) == 3:
            raise RuntimeError("CUDA error: an illegal memory access")

    workload = Workload(step)
    with pytest.raises(WorkloadError, match="illegal memory access"):
        with workload.running():
            time.sleep(0.05)
            workload.mark()
    with pytest.raises(WorkloadError):
        workload.alone(0.01)


# ---- run_bench with a stand-in on the CPU -----------------------------------------------------------------
@pytest.fixture
def cpu_stand_in(monkeypatch):
    """--colocate with a CPU step (a 2 ms sleep) in place of the GPU matmul: everything but the GPU runs."""
    about = {"what": "a 2 ms sleep (test)", "tflop_per_iteration": 0.0}
    monkeypatch.setattr(colocated, "check_colocate", lambda: None)
    monkeypatch.setattr(colocated, "stand_in_trainer", lambda: Workload(sleeping_step(), about))
    monkeypatch.setattr(colocated, "ALONE_SECONDS", 0.05)
    return about


@pytest.mark.parametrize("interleave", [True, False])
def test_colocated_rows_carry_the_workloads_rates_and_the_cells_own(tiny_artifacts, tmp_path, cpu_stand_in, interleave):
    out = tmp_path / "b.json"
    result = run_bench(tiny_artifacts, ["onnx-cpu:fp32", "onnx-cpu:int8"], [1, 2], ["vision", "text"], min_calls=1,
                       min_seconds=0.0, interleave=interleave, progress=lambda line: None, output=out, colocate=True)
    rows = result["rows"]
    assert len(rows) == 8 and result["colocated_workload"] == cpu_stand_in and json.loads(out.read_text()) == result
    for r in rows:
        assert r["error"] is None and r["colocated_error"] is None and r["items_per_s"] > 0  # uncontended, as ever
        assert r["colocated_items_per_s"] > 0
        assert 0 < r["workload_alone_iters_per_s"] <= 500 and 0 < r["workload_colocated_iters_per_s"] <= 500
        assert r["colocated_slowdown"] == round(r["workload_alone_iters_per_s"] / r["workload_colocated_iters_per_s"], 3)
        assert r["gpu_weights_mb"] is None and r["gpu_workspace_mb"] is None  # CPU backends
    table = markdown_table(result)
    lines = table.splitlines()
    assert lines[2].endswith("| GPU MB | colocated items/s | trainer it/s alone | trainer it/s colocated | "
                             "trainer slowdown |")
    assert "GPU weights MB" not in table  # no GPU row
    assert all(line.count("|") == lines[2].count("|") for line in lines[2:2 + 2 + len(rows)])
    assert lines[-1].startswith("Colocated: trainer stand-in a 2 ms sleep (test)") and "No target set yet" in lines[-1]
    row = rows[0]
    assert f"| {row['colocated_slowdown']:.2f}x |" in lines[4]


def test_a_failing_workload_is_recorded_per_cell_and_the_rest_is_measured(tiny_artifacts, tmp_path, monkeypatch):
    def broken():
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(colocated, "check_colocate", lambda: None)
    monkeypatch.setattr(colocated, "stand_in_trainer", lambda: Workload(broken, {"what": "broken"}))
    result = run_bench(tiny_artifacts, ["onnx-cpu:fp32"], [1, 2], ["text"], min_calls=1, min_seconds=0.0,
                       progress=lambda line: None, colocate=True)
    assert result["complete"] is True and len(result["rows"]) == 2
    for r in result["rows"]:
        assert r["error"] is None and r["items_per_s"] > 0  # the uncontended figures stand
        assert r["colocated_error"].startswith("WorkloadError: the colocated workload failed: RuntimeError: CUDA error")
        assert r["colocated_slowdown"] is None and r["colocated_items_per_s"] is None
    assert "| error: WorkloadError: " in markdown_table(result)


# ---- GPU memory: weights and workspace ---------------------------------------------------------------------
def test_weights_are_the_memory_opening_added():
    levels = iter([1000.0, 1850.4])
    assert bench.device_memory_added(lambda: next(levels), lambda: "backend") == ("backend", 850)
    assert bench.device_memory_added(None, lambda: "cpu backend") == ("cpu backend", None)

    def broken():
        raise RuntimeError("device in an error state")

    assert bench.device_memory_added(broken, lambda: 1) == (1, None)
    assert bench.gpu_probe_for("onnx-cpu") is None and bench.gpu_probe_for("torch") is None
    assert bench.gpu_probe_for("no-such-backend") is None


def test_a_cells_workspace_is_its_peak_over_the_memory_in_use_just_before(tiny_artifacts, tmp_path, monkeypatch):
    """A CPU scorer dressed as a cuda one, with a scripted probe: 1000 MiB in use when the block starts
    (its baseline, read after the allocator's cache was emptied), 1600 MiB at its peak."""
    scorer = load_quietly(tiny_artifacts, precision="fp32")
    try:
        inputs = bench_inputs(scorer, 2, tmp_path, 0, stages=("text",))
        monkeypatch.setattr(scorer.backend, "device", "cuda")
        released = []
        monkeypatch.setattr(bench, "release_memory", lambda: released.append(True))
        readings = itertools.chain([1000.0], itertools.repeat(1600.0))
        (row,) = time_block([(scorer, "text", BenchSpec("onnx-cpu", "fp32"))], 2, inputs, 1, 0.0,
                            lambda: next(readings))
    finally:
        scorer.close()
    assert released and row.gpu_mem_mb == 1600 and row.gpu_workspace_mb == 600


def gpu_row(label: str, stage: str, batch: int, weights: float | None, workspace: float | None, **fields) -> dict:
    backend, precision = label.split("/")
    return {"backend": backend, "precision": precision, "device": "cuda", "stage": stage, "batch_size": batch,
            "items_per_s": 1000.0, "p50_ms": 1.0, "p95_ms": 1.0, "peak_rss_mb": 900, "gpu_mem_mb": 5000, "error": None,
            "options": "", "requested": None, "vs_torch_fp32": None, "vs_torch_bf16": None, "runs": None,
            "gpu_weights_mb": weights, "gpu_workspace_mb": workspace, **fields}


def test_gpu_memory_is_judged_against_the_target_at_batch_64():
    rows = [gpu_row("torch-cuda/fp16", "vision", 16, 900, 300), gpu_row("torch-cuda/fp16", "vision", 64, 900, 1200),
            gpu_row("torch-cuda/fp16", "text", 64, 900, 200),
            gpu_row("tensorrt/fp16", "vision", 64, 700, 2500),
            gpu_row("onnx-cuda/fp16", "vision", 64, 800, None, error="OutOfMemoryError: CUDA out of memory"),
            gpu_row("torch-cuda/bf16", "vision", 64, 900, 1200)]  # the target is about fp16
    assert bench.GPU_MEMORY_TARGET_MB == 3072 and bench.GPU_MEMORY_TARGET_BATCH == 64
    assert bench.gpu_memory_targets(rows) == [
        {"label": "torch-cuda/fp16", "weights_mb": 900, "workspace_mb": 1200, "total_mb": 2100, "within": True},
        {"label": "tensorrt/fp16", "weights_mb": 700, "workspace_mb": 2500, "total_mb": 3200, "within": False},
        {"label": "onnx-cuda/fp16", "weights_mb": 800, "workspace_mb": None, "total_mb": None, "within": None}]
    table = markdown_table({"rows": rows})
    lines = table.splitlines()
    assert lines[0].endswith("| GPU MB | GPU weights MB | GPU workspace MB |") and "colocated" not in lines[0]
    assert "| 5000 | 900 | 1200 |" in table
    assert "| onnx-cuda | fp16 | - | cuda | vision | 64 | error: OutOfMemoryError: CUDA out of memory | - | - | - | - | " \
           "- | - | - | - |" in table
    assert "Target (not yet recorded on a GPU): the reward's device memory, vision fp16 + text, weights + workspace " \
           "at batch 64 <= 3072 MB." in table
    assert "- torch-cuda/fp16: 900 MB weights + 1200 MB workspace = 2100 MB, within the target" in table
    assert "- tensorrt/fp16: 700 MB weights + 2500 MB workspace = 3200 MB, OVER the target" in table
    assert "- onnx-cuda/fp16: 800 MB weights + workspace unknown: not judged" in table  # its batch 64 failed
    only_bf16 = markdown_table({"rows": rows[-1:]})
    assert only_bf16.endswith("- no fp16 GPU backend in this run: nothing to judge")


# ---- on a GPU (never run yet: they skip here, each with its reason) --------------------------------------
TORCH_CUDA = BACKENDS["torch-cuda"].unavailable()
torch_cuda = pytest.mark.skipif(TORCH_CUDA is not None, reason=f"torch-cuda: {TORCH_CUDA}")


@pytest.mark.gpu
@torch_cuda
def test_the_stand_in_loops_on_the_gpu_and_draws_from_no_global_rng():
    import torch

    cpu_rng, cuda_rng = torch.random.get_rng_state(), torch.cuda.get_rng_state()
    workload = colocated.stand_in_trainer(size=1024)
    assert workload.alone(0.2) > 0 and workload.about["memory_mb"] == 6
    assert torch.equal(torch.random.get_rng_state(), cpu_rng) and torch.equal(torch.cuda.get_rng_state(), cuda_rng)


@pytest.mark.gpu
@torch_cuda
def test_bench_colocate_on_a_gpu_fills_the_memory_and_colocated_columns(tiny_artifacts, tmp_path):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    assert main(["bench", "--artifacts", str(tiny_artifacts), "--backends", "torch-cuda:fp16", "--batch-sizes", "2,8",
                 "--stages", "vision,text", "--min-calls", "1", "--min-seconds", "0", "--colocate", "--output", str(out),
                 "--markdown", str(md)]) == 0
    result = json.loads(out.read_text())
    assert result["colocated_workload"]["memory_mb"] == 384 and result["gpu"] is not None
    for r in result["rows"]:
        assert r["error"] is None and r["colocated_error"] is None, r
        assert r["gpu_weights_mb"] > 0 and r["gpu_workspace_mb"] is not None  # the tiny model's weights: >= 1 block
        assert r["workload_alone_iters_per_s"] > 0 and r["workload_colocated_iters_per_s"] > 0
        assert r["colocated_slowdown"] > 0 and r["colocated_items_per_s"] > 0
    table = md.read_text()
    assert "| GPU weights MB | GPU workspace MB | colocated items/s |" in table
    assert "Target (not yet recorded on a GPU)" in table and "- torch-cuda/fp16: " in table
