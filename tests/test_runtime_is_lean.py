"""The runtime works without torch, transformers or any other optional dependency: checked in a fresh
interpreter where importing them raises, so even a lazy import on the scoring path would fail the test.
And the other way round: choosing the torch backend is what brings torch in."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from lean_imports import BLOCK_HEAVY, HEAVY


def run(code: str, prelude: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "ignore", "-c", prelude + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_scoring_imports_nothing_optional(tiny_artifacts, sample_images, tmp_path):
    out = run(f"""
        from pickscore_runtime import PickScorer
        from pickscore_runtime import cli
        from pickscore_runtime.cli import main
        from pickscore_runtime.server import PickScoreClient, ServerReward  # the client needs no server framework
        for backend in ("onnx-cpu", "auto"):
            s = PickScorer.load({str(tiny_artifacts)!r}, backend=backend, text_cache_file={str(tmp_path / "c.sqlite")!r})
            r = s.score("a cat", [{str(sample_images[0])!r}, {str(sample_images[3])!r}])
            assert all(x.error is None for x in r.results), r.to_json()
            import numpy as np
            batch = np.random.default_rng(0).integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
            from pickscore_runtime.rewards import PickScoreReward
            for mode in ("exact", "fast"):  # tensors in, on the host: numpy needs no torch
                assert s.score_tensors(["a cat", "a dog"], batch, mode).shape == (2,)
            assert PickScoreReward(s)(batch, ["a cat", "a dog"])[0].shape == (2,)
            s.close()
        assert main(["score", "--artifacts", {str(tiny_artifacts)!r}, "--prompt", "a cat", "--output",
                     {str(tmp_path / "out.jsonl")!r}, {str(sample_images[1])!r}]) == 0
        bad = [m for m in sys.modules if m.split(".")[0] in HEAVY]
        assert not bad, bad
        print("LEAN_OK")
    """, prelude=BLOCK_HEAVY)  # importing any HEAVY module fails
    assert out.returncode == 0 and "LEAN_OK" in out.stdout, out.stderr[-3000:]


def test_the_torch_backend_is_what_imports_torch(tiny_artifacts):
    out = run(f"""
        import sys
        from pickscore_runtime import PickScorer
        s = PickScorer.load({str(tiny_artifacts)!r}, backend="onnx-cpu")
        assert "torch" not in sys.modules
        s = PickScorer.load({str(tiny_artifacts)!r}, backend="torch")
        assert "torch" in sys.modules and "transformers" in sys.modules
        print("TORCH_OK", s.backend.name)
    """)
    assert out.returncode == 0 and "TORCH_OK torch" in out.stdout, out.stderr[-3000:]
