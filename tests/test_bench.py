"""`pickscore bench` produces comparable rows for every backend and stage, a table and a chart; its
round-robin timing is checked with a scripted clock, not with sleeps."""

from __future__ import annotations

import itertools
import json

from pickscore_runtime.bench import DEFAULT_STAGES, time_calls
from pickscore_runtime.cli import main

ROW_KEYS = {"backend", "precision", "device", "stage", "batch_size", "items_per_s", "p50_ms", "p95_ms", "peak_rss_mb",
            "gpu_mem_mb"}


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
    assert all(r["gpu_mem_mb"] is None for r in rows)  # CPU backends have no device memory figure
    assert result["random_weights"] is True and result["machine"]["cores"] >= 1 and result["e2e_workers"] == 1
    assert isinstance(result["machine"]["simd"], list)  # int8 and bf16 speeds hinge on the CPU's SIMD flags
    assert md.read_text().count("\n") == len(rows) + 2
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
