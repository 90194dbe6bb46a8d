"""What "lean" means, shared by tests/test_runtime_is_lean.py and CI's wheel smoke test (.ci/wheel_smoke.py,
which imports this file from the checkout): the optional modules the runtime must not import while scoring,
and the prelude that makes importing any of them fail in a fresh interpreter. Plain Python, no pytest."""

HEAVY = ("torch", "transformers", "pickscore_export", "ray", "tensorrt", "cuda", "fastapi", "uvicorn", "starlette",
         "matplotlib", "pyarrow", "cupy", "openvino")

BLOCK_HEAVY = f"""
import sys, importlib.abc
HEAVY = {HEAVY!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""
