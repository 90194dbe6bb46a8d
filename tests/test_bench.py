"""`pickscore bench` produces comparable rows for every backend and stage, a table and a chart."""

from __future__ import annotations

import json

from pickscore_runtime.bench import STAGES
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
