"""`pickscore bench` produces comparable rows for every backend and stage, a table and a chart."""

from __future__ import annotations

import json
import time

from pickscore_runtime.bench import STAGES, time_calls
from pickscore_runtime.cli import main

ROW_KEYS = {"backend", "precision", "stage", "batch_size", "items_per_s", "p50_ms", "p95_ms", "peak_rss_mb"}


def test_bench_rows_table_and_plot(tiny_artifacts, tmp_path, capsys):
    out, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    code = main(["bench", "--artifacts", str(tiny_artifacts), "--backends", "torch,onnx-fp32,onnx-fp16",
                 "--batch-sizes", "1,2", "--min-calls", "1", "--json", str(out), "--markdown", str(md), "--plot", str(png)])
    assert code == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["backend"], r["precision"]) for r in rows} == {("torch", "fp32"), ("onnx-cpu", "fp32"), ("onnx-cpu", "fp16")}
    assert {r["stage"] for r in rows} == set(STAGES) and {r["batch_size"] for r in rows} == {1, 2}
    assert all(set(r) == ROW_KEYS and r["items_per_s"] > 0 and r["p95_ms"] >= r["p50_ms"] for r in rows)
    assert result["random_weights"] is True and result["machine"]["cores"] >= 1
    assert md.read_text().count("\n") == len(rows) + 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_calls_interleaves_rounds_until_every_fn_has_enough():
    order: list[str] = []
    fns = [lambda: order.append("a"), lambda: order.append("b")]
    times = time_calls(fns, min_calls=3, min_seconds=0.0)
    assert [len(t) for t in times] == [3, 3]
    assert order == ["a", "b"] + ["a", "b"] * 3  # one warm-up each, then round-robin


def test_bench_sequential_mode_gives_the_same_rows(tiny_artifacts, tmp_path):
    out = tmp_path / "seq.json"
    assert main(["bench", "--artifacts", str(tiny_artifacts), "--backends", "onnx-fp32,onnx-fp16", "--batch-sizes", "1",
                 "--stages", "vision,text", "--min-calls", "1", "--sequential", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["interleaved"] is False
    assert [(r["precision"], r["stage"]) for r in result["rows"]] == [
        ("fp32", "vision"), ("fp32", "text"), ("fp16", "vision"), ("fp16", "text")]


def test_time_calls_lets_a_finished_fn_leave_the_rounds():
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1
        time.sleep(0.001)

    def slow():
        calls["slow"] += 1
        time.sleep(0.03)

    times = time_calls([fast, slow], min_calls=2, min_seconds=0.05)
    assert len(times[1]) == 2  # slow reached 0.06 s in its 2 calls and left the rounds
    assert sum(times[0]) >= 0.05 and len(times[0]) > 2  # fast went on alone until its own 0.05 s
    assert calls == {"fast": len(times[0]) + 1, "slow": 3}  # + one warm-up each
