"""Ratios for RESULTS.md, computed from one `pickscore bench --output` file (rows measured side by side):
each backend's vision img/s against torch fp32's, e2e against vision, the cached prompt's latency. Rows
of failed cells (`error`) are left out.

    python benchmarks/ratios.py benchmarks/results/2026-11-25-zen4-avx512/bench_torch_ort_fp32_int8.json
"""

from __future__ import annotations

import json
import sys


def ratios(result: dict) -> list[str]:
    measured = [r for r in result["rows"] if not r.get("error")]
    rows = {(r["backend"], r["precision"], r["stage"], r["batch_size"]): r for r in measured}
    batches = sorted({r["batch_size"] for r in measured})
    engines = list(dict.fromkeys((r["backend"], r["precision"]) for r in measured))
    out = []
    torch = ("torch", "fp32")
    for engine in engines:
        if engine == torch:
            continue
        for b in batches:
            mine, ref = rows.get((*engine, "vision", b)), rows.get((*torch, "vision", b))
            if mine and ref:
                out.append(f"vision {engine[0]}/{engine[1]} vs torch, batch {b}: "
                           f"{mine['items_per_s'] / ref['items_per_s']:.2f}x ({mine['items_per_s']:.3f} vs {ref['items_per_s']:.3f} img/s)")
    for engine in engines:
        for b in batches:
            e2e, vision = rows.get((*engine, "e2e", b)), rows.get((*engine, "vision", b))
            if e2e and vision:
                out.append(f"e2e / vision {engine[0]}/{engine[1]}, batch {b}: {e2e['items_per_s'] / vision['items_per_s']:.1%}")
    for engine in engines:
        cached = rows.get((*engine, "text-cached", 1))
        if cached:
            out.append(f"cached prompt, {engine[0]}/{engine[1]}: p50 {cached['p50_ms']:.3f} ms, p95 {cached['p95_ms']:.3f} ms")
    return out


if __name__ == "__main__":
    print("\n".join(ratios(json.load(open(sys.argv[1])))))
