"""The runtime must work without torch or transformers: checked in a fresh interpreter where importing
either raises, so even a lazy import on the scoring path would fail the test."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_scoring_imports_neither_torch_nor_transformers(tiny_artifacts, sample_images):
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "pickscore_export"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import pickscore_runtime
        from pickscore_runtime import PickScorer
        from pickscore_runtime import cli
        s = PickScorer.load({str(tiny_artifacts)!r}, backend="onnx-cpu")
        r = s.score("a cat", [{str(sample_images[0])!r}, {str(sample_images[3])!r}])
        assert all(x.error is None for x in r.results), r.to_json()
        bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "pickscore_export")]
        assert not bad, bad
        print("LEAN_OK")
    """)
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "LEAN_OK" in out.stdout, out.stderr[-3000:]
