"""pytest-benchmark suite: `pytest benchmarks --benchmark-only` (tiny CLIP smoke run), or with
PICKSCORE_BENCH_ARTIFACTS=DIR on real artifacts. `pickscore bench` is the side-by-side tool whose rows
RESULTS.md reports; this suite tracks the same stages over time with pytest-benchmark's statistics."""

from __future__ import annotations

import pytest

from pickscore_runtime.bench import DEFAULT_STAGES as STAGES, bench_inputs, stage_call


@pytest.fixture(scope="session")
def inputs(scorer, tmp_path_factory):
    return bench_inputs(scorer, 4, tmp_path_factory.mktemp("jpegs"), n_jpegs=8)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("batch", [1, 4])
def test_stage(benchmark, scorer, inputs, stage, batch):
    call, items = stage_call(scorer, stage, batch, inputs)
    call()  # warm-up (fills the text cache for text-cached)
    benchmark.extra_info.update(backend=scorer.backend.name, precision=scorer.backend.precision, items_per_call=items)
    benchmark.pedantic(call, rounds=5, iterations=1)
