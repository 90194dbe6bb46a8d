"""Ratios for RESULTS.md, computed from one `pickscore bench --output` file (rows measured side by side):
each CPU row's items/s against torch fp32's and torch bf16's (the same ratios `pickscore bench` writes:
pickscore_runtime.bench.with_torch_ratios, recomputed so files written before those fields read the same),
e2e against vision, the cached prompt's latency. Rows of failed cells (`error`) are left out.

    python benchmarks/ratios.py benchmarks/results/2026-11-25-zen4-avx512/bench_torch_ort_fp32_int8.json
"""

from __future__ import annotations

import json
import sys

from pickscore_runtime.bench import TORCH_REFERENCES, row_label, torch_reference, with_torch_ratios


def ratios(result: dict) -> list[str]:
    rows = with_torch_ratios(result["rows"])
    measured = [r for r in rows if not r.get("error")]
    by_cell = {(row_label(r), r["stage"], r["batch_size"]): r for r in measured}
    batches = sorted({r["batch_size"] for r in measured})
    engines = list(dict.fromkeys(row_label(r) for r in measured))
    stages = list(dict.fromkeys(r["stage"] for r in measured))
    out = []
    for r in sorted(measured, key=lambda r: stages.index(r["stage"])):  # stable: backends in the run's order per stage
        for key, precision in TORCH_REFERENCES.items():
            reference = torch_reference(r, rows, precision)
            if r[key] is not None and reference is not r:  # a torch row against itself says nothing
                out.append(f"{r['stage']} {row_label(r)} vs torch/{precision}, batch {r['batch_size']}: {r[key]:.2f}x "
                           f"({r['items_per_s']:.3f} vs {reference['items_per_s']:.3f} items/s)")
    for engine in engines:
        for b in batches:
            e2e, vision = by_cell.get((engine, "e2e", b)), by_cell.get((engine, "vision", b))
            if e2e and vision:
                out.append(f"e2e / vision {engine}, batch {b}: {e2e['items_per_s'] / vision['items_per_s']:.1%}")
    for engine in engines:
        cached = by_cell.get((engine, "text-cached", 1))
        if cached:
            out.append(f"cached prompt, {engine}: p50 {cached['p50_ms']:.3f} ms, p95 {cached['p95_ms']:.3f} ms")
    return out


if __name__ == "__main__":
    print("\n".join(ratios(json.load(open(sys.argv[1])))))
