"""`pickscore bench` produces comparable rows for every backend and stage, a table and a chart, and
records the code, command and machine beside them; its round-robin timing is checked with a scripted
clock, not with sleeps. A cell that fails for a real reason (a batch size the artifacts' ONNX graph
refuses; a precision the backend does not run) becomes an error row while every other cell is measured,
and the JSON (and the rows' JSON lines, written first) hold what was measured even when the run is stopped.
Backend specs carry backend options; the vision stage keeps batches in flight; the GPU memory probe
survives CUDA bindings that raise. Every CPU row is compared with torch fp32 and torch bf16 from the same run,
and `auto` is measured as the backend and precision it picks for the artifacts here, named in its rows."""

from __future__ import annotations

import importlib.util
import itertools
import json
import warnings
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import load_quietly
from pickscore_runtime import bench
from pickscore_runtime.bench import (DEFAULT_STAGES, PRESETS, STAGES, VISION_BATCHES, BenchSpec, bench_inputs,
                                     markdown_table, parse_backend_specs, preset, run_bench, stage_call, time_calls,
                                     with_torch_ratios)
from pickscore_runtime.cli import main
from pickscore_runtime.errors import PickScoreError

GPU_AND_COLOCATED_KEYS = {"gpu_weights_mb", "gpu_workspace_mb",  # cuda rows; --colocate (tests/test_colocated.py)
                          "colocated_items_per_s", "workload_alone_iters_per_s", "workload_colocated_iters_per_s",
                          "colocated_slowdown", "colocated_error"}
ROW_KEYS = {"backend", "precision", "device", "stage", "batch_size", "items_per_s", "p50_ms", "p95_ms", "peak_rss_mb",
            "gpu_mem_mb", "error", "options", "requested", "vs_torch_fp32", "vs_torch_bf16", "runs"} | GPU_AND_COLOCATED_KEYS
REPO = Path(__file__).resolve().parents[1]


def test_bench_rows_table_and_plot(tiny_artifacts, tmp_path):
    out, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    code = main(["bench", "--artifacts", str(tiny_artifacts), "--backends", "torch:fp32,torch:bf16,onnx-cpu:fp32,onnx-cpu:int8",
                 "--batch-sizes", "1,2", "--min-calls", "1", "--min-seconds", "0", "--workers", "1", "--output", str(out),
                 "--markdown", str(md), "--plot", str(png)])
    assert code == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["backend"], r["precision"]) for r in rows} == {("torch", "fp32"), ("torch", "bf16"), ("onnx-cpu", "fp32"),
                                                              ("onnx-cpu", "int8")}
    assert {r["stage"] for r in rows} == set(DEFAULT_STAGES) and {r["batch_size"] for r in rows} == {1, 2}
    assert len(rows) == 4 * len(DEFAULT_STAGES) * 2
    assert all(set(r) == ROW_KEYS and r["items_per_s"] > 0 and r["p95_ms"] >= r["p50_ms"] for r in rows)
    assert all(r["gpu_mem_mb"] is None and r["error"] is None for r in rows)  # CPU backends have no device memory figure
    assert all(r[key] is None for r in rows for key in GPU_AND_COLOCATED_KEYS)  # nor weights, workspace, colocated figures
    assert result["colocated_workload"] is None
    assert result["random_weights"] is True and result["machine"]["cores"] >= 1 and result["e2e_workers"] == 1
    assert isinstance(result["machine"]["simd"], list)  # int8 and bf16 speeds hinge on the CPU's SIMD flags
    assert result["machine"]["cpu"] and result["machine"]["usable_cores"] >= 1
    assert result["complete"] is True and "stopped_by" not in result
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: the commit; else (an sdist's tests) the package version alone
        assert result["code"]["commit"] == head.stdout.strip() and isinstance(result["code"]["modified"], bool)
    else:
        assert result["code"]["commit"] is None
    assert result["code"]["version"]
    assert result["command"] == shlex.join(sys.argv) and result["cwd"] == os.getcwd()  # this process's command line
    # every row against the torch fp32 and bf16 rows of its stage and batch, timed in the same rounds
    cells = {(r["backend"], r["precision"], r["stage"], r["batch_size"]): r for r in rows}
    for r in rows:
        for key, precision in (("vs_torch_fp32", "fp32"), ("vs_torch_bf16", "bf16")):
            reference = cells[("torch", precision, r["stage"], r["batch_size"])]
            assert r[key] == pytest.approx(r["items_per_s"] / reference["items_per_s"], abs=1e-3), (r, key)
    assert cells[("torch", "bf16", "vision", 1)]["vs_torch_bf16"] == 1.0
    md_lines = md.read_text().splitlines()
    simd = ", ".join(result["machine"]["simd"]) or "none of the flags"
    assert md_lines[0].startswith("Machine: ") and f"SIMD: {simd}" in md_lines[0]  # the flags int8 / bf16 speed hinge on
    assert "| vs torch fp32 | vs torch bf16 |" in md_lines[2] and len(md_lines) == len(rows) + 4
    int8 = cells[("onnx-cpu", "int8", "text", 2)]
    assert f"| onnx-cpu | int8 | - | cpu | text | 2 | {int8['items_per_s']:.3f} | {int8['vs_torch_fp32']:.2f}x | " \
           f"{int8['vs_torch_bf16']:.2f}x |" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_calls_interleaves_rounds_until_every_fn_has_enough():
    order: list[str] = []
    fns = [lambda: order.append("a"), lambda: order.append("b")]
    times = time_calls(fns, min_calls=3, min_seconds=0.0)
    assert [len(t) for t in times] == [3, 3]
    assert order == ["a", "b"] + ["a", "b"] * 3  # one warm-up each, then round-robin


def test_time_calls_lets_a_finished_fn_leave_the_rounds():
    """With each fn's own clock scripted (in whole ticks): fast calls take 1 tick, slow ones 3."""
    calls = {"fast": 0, "slow": 0}
    fast_clock, slow_clock = itertools.count(0, 1), itertools.count(0, 3)

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1

    times = time_calls([fast, slow], min_calls=2, min_seconds=5, clocks=[lambda: next(fast_clock), lambda: next(slow_clock)])
    assert times[1] == [3, 3]  # slow reached 6 ticks in 2 calls and left the rounds
    assert times[0] == [1] * 5  # fast went on alone until its 5
    assert calls == {"fast": 6, "slow": 3}  # + one warm-up each


def test_sequential_and_interleaved_modes_give_the_same_cells(tiny_artifacts, tmp_path):
    cells = {}
    for mode in ("--sequential", None):
        out = tmp_path / f"{mode}.json"
        args = ["bench", "--artifacts", str(tiny_artifacts), "--backends", "onnx-cpu:fp32,onnx-cpu:fp16", "--batch-sizes",
                "1,2", "--stages", "vision,tensors-exact", "--min-calls", "1", "--min-seconds", "0", "--output", str(out)] + ([mode] if mode else [])
        assert main(args) == 0
        result = json.loads(out.read_text())
        assert result["interleaved"] is (mode is None)
        cells[mode] = [(r["backend"], r["precision"], r["stage"], r["batch_size"]) for r in result["rows"]]
    assert cells["--sequential"] == cells[None] == [
        ("onnx-cpu", p, stage, b) for p in ("fp32", "fp16") for stage in ("vision", "tensors-exact") for b in (1, 2)]


def test_time_calls_records_a_failing_fn_and_times_the_others():
    """errors=[]: the fn that raises (here on its third call: one warm-up, then its second timed call) leaves
    the rounds with no times; the other is timed in full."""
    calls = {"ok": 0, "bad": 0}

    def ok():
        calls["ok"] += 1

    def bad():
        calls["bad"] += 1
        if calls["bad"] == 3:
            raise MemoryError("out of memory at this batch")

    errors: list = []
    times = time_calls([ok, bad], min_calls=4, min_seconds=0.0, errors=errors)
    assert [len(t) for t in times] == [4, 0]
    assert errors[0] is None and isinstance(errors[1], MemoryError)
    assert calls == {"ok": 5, "bad": 3}
    with pytest.raises(MemoryError):  # without errors=, the first failure propagates as before
        calls["bad"] = 0
        time_calls([ok, bad], min_calls=4, min_seconds=0.0)


def batch_one_artifacts(src: Path, dst: Path) -> Path:
    """A copy of `src` whose fp32 vision graph ends in a Reshape to one row (the manifest updated to match):
    its inputs and outputs are still the tower's, so it loads, and ONNX Runtime itself then fails any batch
    but 1 inside the graph. Nothing in the runtime is mocked."""
    import onnx
    from onnx import helper, numpy_helper

    from pickscore_runtime.artifacts import MANIFEST, Artifacts, file_entry, write_manifest

    shutil.copytree(src, dst)
    artifacts = Artifacts.load(dst, hash_check="size")
    vision = artifacts.tower_file("vision", "fp32")
    model = onnx.load(str(vision))
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [name + "_any_batch" if name == out else name for name in node.output]
    one_row = numpy_helper.from_array(np.array([1, artifacts.embed_dim], np.int64), "one_row")
    model.graph.initializer.append(one_row)
    model.graph.node.append(helper.make_node("Reshape", [out + "_any_batch", "one_row"], [out]))
    onnx.save(model, str(vision))
    manifest = json.loads((dst / MANIFEST).read_text())
    variant = manifest["towers"]["vision"]["precisions"]["fp32"]
    variant["files"] = [file_entry(dst / f["path"], dst) for f in variant["files"]]
    write_manifest(dst, {k: v for k, v in manifest.items() if k not in ("format", "format_version")})
    return dst


@pytest.fixture(scope="module")
def batch_one(tiny_artifacts, tmp_path_factory) -> Path:
    return batch_one_artifacts(tiny_artifacts, tmp_path_factory.mktemp("batch1") / "art")


@pytest.mark.parametrize("interleave", [True, False])
def test_a_failing_cell_is_an_error_row_and_the_rest_are_measured(batch_one, tmp_path, interleave):
    out = tmp_path / "bench.json"
    lines: list[str] = []
    result = run_bench(batch_one, [("onnx-cpu", "fp32"), ("onnx-cpu", "bf16")], [1, 2], ["vision", "text"], min_calls=1,
                       min_seconds=0.0, interleave=interleave, progress=lines.append, output=out,
                       command=["pickscore", "bench", "--batch-sizes", "1,2"])
    cells = {(r["precision"], r["stage"], r["batch_size"]): r for r in result["rows"]}
    assert list(cells) == [("fp32", "vision", 1), ("fp32", "vision", 2), ("fp32", "text", 1), ("fp32", "text", 2),
                           ("bf16", "vision", 1), ("bf16", "vision", 2), ("bf16", "text", 1), ("bf16", "text", 2)]
    measured = [cells[("fp32", "vision", 1)], cells[("fp32", "text", 1)], cells[("fp32", "text", 2)]]
    assert all(r["error"] is None and r["items_per_s"] > 0 for r in measured)  # timed beside the failing cell
    failed = cells[("fp32", "vision", 2)]
    assert failed["items_per_s"] is None and failed["p50_ms"] is None and failed["device"] == "cpu"
    assert "cannot be reshaped" in failed["error"] and "{2,64}" in failed["error"]  # ONNX Runtime's own failure
    unopened = [r for r in result["rows"] if r["precision"] == "bf16"]  # the registry refuses it at open
    assert all(r["items_per_s"] is None and "not bf16" in r["error"] for r in unopened)
    assert result["complete"] is True and result["command"] == "pickscore bench --batch-sizes 1,2"
    assert json.loads(out.read_text()) == result  # the file is the result
    assert sorted(json.loads(line)["stage"] + str(json.loads(line)["batch_size"]) for line in lines) == \
        sorted(r["stage"] + str(r["batch_size"]) for r in result["rows"])  # every row said once, as measured
    assert all(r["vs_torch_fp32"] is None and r["vs_torch_bf16"] is None for r in result["rows"])  # no torch row
    table = markdown_table(result)
    assert "| onnx-cpu | fp32 | - | cpu | vision | 2 | error: " in table and table.count("\n") == len(result["rows"]) + 3
    assert "| onnx-cpu | fp32 | - | cpu | text | 1 | " in table and " | - | - | " in table  # no ratio to show


def test_the_json_holds_what_was_measured_when_the_run_is_stopped(tiny_artifacts, tmp_path):
    """A Ctrl-C (KeyboardInterrupt, raised from the progress callback once the first block's rows are said)
    stops the run; the output file still holds those rows, says it is not complete and why it stopped."""
    out = tmp_path / "bench.json"

    def stop(line: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(tiny_artifacts, [("onnx-cpu", "fp32"), ("onnx-cpu", "int8")], [1, 2], ["vision"], min_calls=1,
                  min_seconds=0.0, progress=stop, output=out)
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and partial["stopped_by"] == "KeyboardInterrupt"
    assert [(r["precision"], r["batch_size"]) for r in partial["rows"]] == [("fp32", 1), ("int8", 1)]
    assert all(r["items_per_s"] > 0 for r in partial["rows"]) and partial["machine"]["simd"] is not None


def test_presets_name_runnable_scenarios():
    for name, p in PRESETS.items():
        assert p.about and p.batch_sizes and all(b >= 1 for b in p.batch_sizes) and p.min_calls >= 1, name
        assert set(p.stages) <= set(STAGES), name
        for spec in p.backends:
            assert spec.checked() is spec, name  # backend, precision and options as the registry declares them
            assert parse_backend_specs(str(spec)) == [spec], name  # and written as the CLI reads them
    # every CPU row has both torch references, auto shows what this machine would serve, and the text tower
    # (once per prompt, the cost when prompts are unique) is measured beside the vision tower
    assert [str(s) for s in preset("cpu").backends] == ["torch:fp32", "torch:bf16", "onnx-cpu:fp32", "onnx-cpu:int8",
                                                    "openvino:int8", "auto"]
    assert preset("cpu").stages == ("vision", "text")
    with pytest.raises(PickScoreError, match="known: cpu, cpu-e2e"):
        preset("fastest")


def test_the_gpu_preset_measures_eager_against_compiled_fp16_against_bf16_batch_1_to_256():
    gpu = preset("gpu")
    torch_cuda = {(s.precision, s.options) for s in gpu.backends if s.name == "torch-cuda"}
    assert {("fp16", ()), ("bf16", ()), ("fp16", (("compile", True),)),
            ("fp16", (("compile", True), ("cuda_graphs", True)))} <= torch_cuda
    assert min(gpu.batch_sizes) == 1 and max(gpu.batch_sizes) == 256 and len(gpu.batch_sizes) >= 4


# ---- backend options in specs ---------------------------------------------------------------------------
def test_backend_specs_carry_backend_options_checked_against_the_registry():
    specs = parse_backend_specs("onnx-cpu:int8,tensorrt:fp16:cuda_graphs=true,build=false,onnx-cpu")
    assert specs == [BenchSpec("onnx-cpu", "int8"), BenchSpec("tensorrt", "fp16", (("cuda_graphs", True), ("build", False))),
                     BenchSpec("onnx-cpu", None)]
    assert str(specs[1]) == "tensorrt:fp16:cuda_graphs=true,build=false" and specs[1].options_text == "cuda_graphs=true,build=false"
    for text in ("onnx-cpu", "tensorrt::cuda_graphs=true", "torch:bf16"):  # each spec is written as it is read
        assert [str(s) for s in parse_backend_specs(text)] == [text]
    with pytest.raises(PickScoreError, match="takes no option 'compile'"):
        parse_backend_specs("onnx-cpu:fp32:compile=true")
    with pytest.raises(PickScoreError, match="cuda_graphs of tensorrt takes bool, got 'yes'"):
        parse_backend_specs("tensorrt:fp16:cuda_graphs=yes")
    with pytest.raises(PickScoreError, match="comes before any backend"):
        parse_backend_specs("cuda_graphs=true,tensorrt")
    with pytest.raises(PickScoreError, match="runs fp16, fp32, not int8"):
        parse_backend_specs("tensorrt:int8")


def test_a_specs_options_reach_its_backend_and_label_its_rows(tiny_artifacts, tmp_path, monkeypatch):
    """tensorrt cannot open here: its cells are error rows, which still name the options it was asked with."""
    opened = []
    real = bench.create_backend

    def recording(artifacts, name, precision, **options):
        opened.append((name, precision, options))
        return real(artifacts, name, precision, **options)

    monkeypatch.setattr(bench, "create_backend", recording)
    result = run_bench(tiny_artifacts, ["onnx-cpu:fp32", "tensorrt:fp16:cuda_graphs=true"], [1], ["vision"], min_calls=1,
                       min_seconds=0.0, output=tmp_path / "b.json")
    assert opened[1] == ("tensorrt", "fp16", {"threads": None, "cuda_graphs": True})
    (cpu, trt) = result["rows"]
    assert (cpu["options"], cpu["error"]) == ("", None)
    assert trt["options"] == "cuda_graphs=true" and "cannot run here" in trt["error"]
    assert "| tensorrt | fp16 | cuda_graphs=true | cuda | vision | 1 | error: " in markdown_table(result)
    assert bench.row_label(trt) == "tensorrt/fp16 (cuda_graphs=true)"


# ---- the vision stage overlaps copies with compute ----------------------------------------------------
class Recorded:
    """A real backend with queue_depth 2 (a GPU backend's), recording each submit, each collect and each
    synchronous call: which of them the bench's vision stage uses, and in what order."""

    def __init__(self, backend):
        self.inner, self.queue_depth, self.events = backend, 2, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed_images(self, pixels):
        self.events.append("embed")
        return self.inner.embed_images(pixels)

    def submit_images(self, pixels):
        k = sum(e.startswith("submit") for e in self.events)
        self.events.append(f"submit {k}")
        pending, events = self.inner.submit_images(pixels), self.events

        class Pending:
            def result(self):
                events.append(f"result {k}")
                return pending.result()
        return Pending()


def test_the_vision_stage_keeps_batches_in_flight(tiny_artifacts, tmp_path):
    scorer = load_quietly(tiny_artifacts, precision="fp32")
    inputs = bench_inputs(scorer, 2, tmp_path, 0, stages=("vision",))
    scorer.backend = recorded = Recorded(scorer.backend)
    call, items = stage_call(scorer, "vision", 2, inputs)
    embeddings = call()
    assert items == 2 * VISION_BATCHES == sum(len(e) for e in embeddings)
    # each batch is submitted before the one before it is collected: its copy overlaps that one's compute
    assert recorded.events == ["submit 0", "submit 1", "result 0", "submit 2", "result 1", "submit 3", "result 2", "result 3"]
    np.testing.assert_allclose(embeddings[-1], scorer.backend.inner.embed_images(inputs.pixels[:2]), atol=1e-6)
    scorer.close()


def test_the_gpu_memory_probe_survives_bindings_that_raise_without_a_driver(monkeypatch):
    """Some cuda-bindings releases raise RuntimeError("Failed to dlopen libcuda.so.1") instead of returning an
    error code; the probe then has no figure, and the bench goes on."""
    from pickscore_runtime import cuda_memory

    def no_driver():
        raise RuntimeError("Failed to dlopen libcuda.so.1")

    monkeypatch.setattr(cuda_memory, "memory_in_use_mb", no_driver)
    assert bench.gpu_memory_probe() is None  # no torch with CUDA here either


# ---- rows written as they are measured -------------------------------------------------------------------
def test_rows_are_appended_as_json_lines_before_the_json_is_rewritten(tiny_artifacts, tmp_path, monkeypatch):
    """A run killed while it rewrites the JSON (here: stopped inside that write) still leaves every row measured
    so far in the JSON-lines file beside it."""
    def killed(path, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "write_json", killed)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        run_bench(tiny_artifacts, ["onnx-cpu:fp32", "onnx-cpu:int8"], [1, 2], ["vision"], min_calls=1, min_seconds=0.0,
                  output=out)
    assert not out.exists()
    lines = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert [(r["precision"], r["batch_size"]) for r in lines] == [("fp32", 1), ("int8", 1)]
    assert all(set(r) == ROW_KEYS and r["items_per_s"] > 0 for r in lines)


# ---- against torch fp32 / bf16 ---------------------------------------------------------------------------
def measured_row(backend: str, precision: str, items_per_s: float, **fields) -> dict:
    return {"backend": backend, "precision": precision, "device": "cpu", "stage": "vision", "batch_size": 1,
            "items_per_s": items_per_s, "error": None, "options": "", "requested": None, **fields}


def test_ratios_compare_cpu_rows_with_the_plain_torch_rows_of_their_stage_and_batch():
    rows = with_torch_ratios([
        measured_row("torch", "fp32", 0.4),
        measured_row("torch", "bf16", 0.8, stage="text"),  # another stage: no bf16 reference for vision
        measured_row("torch", "fp32", 4.0, options="compile=true"),  # compiled: not the model card's code
        measured_row("torch", "fp32", 8.0, requested="auto"),  # picked by auto: measured, not a reference
        measured_row("onnx-cpu", "int8", 1.2),
        measured_row("onnx-cpu", "int8", 1.6, batch_size=4),  # no torch row at batch 4
        measured_row("onnx-cpu", "int8", None, error="MemoryError"),
        measured_row("onnx-cuda", "fp16", 40.0, device="cuda"),
    ])
    assert [(r["vs_torch_fp32"], r["vs_torch_bf16"]) for r in rows] == [
        (1.0, None), (None, 1.0), (10.0, None), (20.0, None), (3.0, None), (None, None), (None, None), (None, None)]


def load_ratios_script():
    spec = importlib.util.spec_from_file_location("bench_ratios", REPO / "benchmarks" / "ratios.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_ratios_script_reads_the_benchs_own_ratios_from_files_with_or_without_them():
    """A file written before the ratio fields existed (no device, options, requested or vs_torch_*) reads the same."""
    old_rows = [{k: v for k, v in r.items() if k in ("backend", "precision", "stage", "batch_size", "items_per_s")}
                for r in (measured_row("torch", "fp32", 0.4), measured_row("torch", "bf16", 0.8),
                          measured_row("onnx-cpu", "int8", 1.2))]
    lines = load_ratios_script().ratios({"rows": old_rows})
    assert "vision onnx-cpu/int8 vs torch/fp32, batch 1: 3.00x (1.200 vs 0.400 items/s)" in lines
    assert "vision onnx-cpu/int8 vs torch/bf16, batch 1: 1.50x (1.200 vs 0.800 items/s)" in lines
    assert "vision torch/bf16 vs torch/fp32, batch 1: 2.00x (0.800 vs 0.400 items/s)" in lines
    assert not any("torch/fp32 vs torch/fp32" in line for line in lines)  # a row against itself is left out


# ---- auto in --backends -------------------------------------------------------------------------------
@pytest.mark.parametrize("int8_gated", [True, False])
def test_auto_is_measured_as_the_backend_and_precision_it_picks_here(tiny_artifacts, tmp_path, int8_gated):
    """With int8 recorded as passing the gate on these towers, auto serves int8 (on onnx-cpu today); without a
    record, fp32. The row names what select_backend picks, says it was auto's pick, and drops the options the picked
    backend does not take (compile: torch-cuda's, which auto may pick on a GPU machine)."""
    from pickscore_runtime.artifacts import Artifacts
    from pickscore_runtime.backends import select_backend
    from pickscore_runtime.gate_records import GATE_FILE, record_gate_results

    art = shutil.copytree(tiny_artifacts, tmp_path / "art", ignore=shutil.ignore_patterns(GATE_FILE))
    artifacts = Artifacts.load(art, hash_check="size")
    if int8_gated:
        record_gate_results(art, artifacts.fingerprint,
                            [{"backend": "onnx-cpu", "precision": "int8", "passed": True, "gate_version": 3}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without a record, auto says why it passed over int8
        picked, precision, _ = select_backend(artifacts, "auto")
        result = run_bench(art, ["onnx-cpu:fp32", "auto::compile=true"], [1], ["vision"], min_calls=1,
                           min_seconds=0.0, output=tmp_path / "b.json")
    assert (picked.device, precision) == ("cpu", "int8" if int8_gated else "fp32")  # whichever CPU backend auto ranks first
    named, auto = result["rows"]
    assert (named["backend"], named["precision"], named["requested"]) == ("onnx-cpu", "fp32", None)
    assert (auto["backend"], auto["precision"], auto["requested"], auto["options"]) == (picked.name, precision, "auto", "")
    assert auto["error"] is None and auto["items_per_s"] > 0
    assert f"| {picked.name} (auto) | {precision} | - | cpu | vision | 1 | " in markdown_table(result)
    assert bench.row_label(auto) == f"auto: {picked.name}/{precision}"


def test_auto_takes_no_precision(tiny_artifacts, tmp_path, capsys):
    with pytest.raises(PickScoreError, match="auto picks the precision as well as the backend"):
        parse_backend_specs("onnx-cpu:fp32,auto:int8")
    with pytest.raises(SystemExit) as info:  # the CLI refuses it before anything opens
        main(["bench", "--artifacts", str(tiny_artifacts), "--backends", "auto:int8"])
    assert info.value.code == 2 and "auto picks the precision" in capsys.readouterr().err
    # run_bench, given it anyway, says so in its rows (as for any spec that cannot open) and measures the rest
    result = run_bench(tiny_artifacts, ["onnx-cpu:fp32", "auto:int8"], [1], ["vision"], min_calls=1, min_seconds=0.0)
    named, refused = result["rows"]
    assert named["error"] is None
    assert (refused["backend"], refused["requested"]) == ("auto", "auto") and "auto picks the precision" in refused["error"]
