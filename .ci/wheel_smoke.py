"""The built wheel, alone, is the product: run by .ci/run with the python of a fresh venv where only
`torch==2.13.0` and `dist/<wheel>[cpu,export]` are installed, from a folder outside the checkout (so the
source tree cannot be imported). Needs no network and no file of the repository but pyproject.toml and
the version file, read as text to check the version.

    python .ci/wheel_smoke.py --source REPO [--workdir DIR]

Checks: the installed version is the pyproject one (its dynamic version attribute); exactly one ONNX
Runtime is installed; `pickscore export --random-init --model <the package's tiny CLIP folder>` then
`pickscore score --artifacts` on a generated PNG; and the lean runtime: importing pickscore_runtime and
scoring imports neither torch nor transformers (nor any other optional dependency)."""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the lean rule, shared with the tests
from lean_imports import BLOCK_HEAVY, HEAVY  # noqa: E402
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[wheel smoke {time.monotonic() - T0:6.1f} s] {msg}", flush=True)


def source_version(repo: Path) -> str:
    """The version pyproject.toml declares: its dynamic `version = {attr = ...}`, read from the file."""
    config = tomllib.loads((repo / "pyproject.toml").read_text())
    attr = config["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    module, name = attr.rsplit(".", 1)
    package, *rest = module.split(".")
    folder = repo / config["tool"]["setuptools"]["package-dir"][package]
    path = folder.joinpath(*rest, "__init__.py") if (folder.joinpath(*rest)).is_dir() else folder.joinpath(*rest).with_suffix(".py")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"{attr} not found in {path}")


def run(*cmd: str, timeout: int = 600) -> subprocess.CompletedProcess:
    say("$ " + " ".join(cmd))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise SystemExit(f"FAILED ({out.returncode}): {' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, required=True, help="the checkout (pyproject.toml is read as text)")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()

    import pickscore_runtime

    repo = args.source.resolve()
    where = Path(pickscore_runtime.__file__).resolve()
    if repo in where.parents:
        raise SystemExit(f"pickscore_runtime was imported from the checkout ({where}), not from the wheel")
    expected = source_version(repo)
    installed = metadata.version("pickscore-runtime")
    say(f"pickscore-runtime {pickscore_runtime.__version__} (metadata {installed}) from {where.parent}; pyproject: {expected}")
    if not pickscore_runtime.__version__ == installed == expected:
        raise SystemExit(f"version mismatch: __version__ {pickscore_runtime.__version__}, metadata {installed}, pyproject {expected}")

    ort = {name for name in ("onnxruntime", "onnxruntime-gpu") if _installed(name)}
    if ort != {"onnxruntime"}:
        raise SystemExit(f"[cpu,export] should install exactly onnxruntime, found: {sorted(ort) or 'none'}")

    from pickscore_models import tiny_clip_dir

    tiny = tiny_clip_dir()
    if repo in tiny.resolve().parents:
        raise SystemExit(f"the tiny model folder comes from the checkout: {tiny}")
    pickscore = str(Path(sys.executable).parent / "pickscore")
    run(pickscore, "--version")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        art = tmp / "art"
        run(pickscore, "export", "--model", str(tiny), "--random-init", "--out", str(art), "--precision", "fp32,int8")
        from PIL import Image
        import numpy as np

        images = []
        for i in range(2):
            path = tmp / f"img{i}.png"
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path)
            images.append(str(path))
        out = run(pickscore, "score", "--artifacts", str(art), "--prompt", "a cat astronaut", "--json", *images)
        scores = json.loads(out.stdout)
        values = [r["score"] for r in scores["results"]]
        if len(values) != 2 or not all(isinstance(v, float) and math.isfinite(v) for v in values):
            raise SystemExit(f"unexpected scores: {out.stdout[:2000]}")
        say(f"scores {values} ({scores.get('backend')}/{scores.get('precision')})")

        lean = run(sys.executable, "-W", "ignore", "-c", BLOCK_HEAVY + textwrap.dedent(f"""
            from pickscore_runtime import PickScorer
            from pickscore_runtime.cli import main
            with PickScorer.load({str(art)!r}, backend="auto") as s:
                r = s.score("a cat", {images!r})
                assert all(x.error is None for x in r.results), r.to_json()
            assert main(["score", "--artifacts", {str(art)!r}, "--prompt", "a cat", "--output",
                         {str(tmp / "out.jsonl")!r}, {images[0]!r}]) == 0
            bad = [m for m in sys.modules if m.split(".")[0] in HEAVY]
            assert not bad, bad
            print("LEAN_OK")
        """))
        if "LEAN_OK" not in lean.stdout:
            raise SystemExit(f"lean check failed:\n{lean.stdout}\n{lean.stderr[-3000:]}")
    say("OK: the wheel installs, exports, scores and stays lean")
    return 0


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
