"""Make this checkout's packages importable without installing them, for the scripts in benchmarks/gpu/ run
on a machine where the project is not installed (the GPU machine: the tree is copied there, nothing more).

pyproject.toml maps the import packages onto the top-level folders (`pickscore_runtime` = runtime/, ...),
so `PYTHONPATH=.` does not import them. `ensure_project()` puts a folder of symlinks named as the packages
(pickscore_runtime -> runtime, ...) first on sys.path and on PYTHONPATH (for the subprocesses), unless
this checkout's packages are already what `import pickscore_runtime` finds (an editable install of it).
Standard library only: it runs before any of the project can be imported.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def package_dirs(root: Path = REPO) -> dict[str, str]:
    """{import package: folder} from pyproject.toml's [tool.setuptools] package-dir."""
    text = (root / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10: the one inline table, read by hand
        line = re.search(r"^package-dir\s*=\s*\{(.*)\}\s*$", text, re.M)
        return dict(re.findall(r'"([^"]+)"\s*=\s*"([^"]+)"', line.group(1))) if line else {}
    return dict(tomllib.loads(text)["tool"]["setuptools"]["package-dir"])


def found_in(package: str, root: Path) -> bool:
    """Whether `import package` would load it from `root` (an editable install, or an earlier shim)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return False
    if spec is None or spec.origin is None:
        return False
    return Path(spec.origin).resolve().is_relative_to(root.resolve())


def ensure_project(root: Path = REPO) -> dict[str, str | None]:
    """Make `root`'s packages the ones imported, here and in subprocesses started with os.environ.
    Returns {"how": "installed" (already importable from root) or "path shim", "shim": its folder or None}."""
    dirs = package_dirs(root)
    if all(found_in(package, root) for package in dirs):
        return {"how": "installed", "shim": None}
    shim = Path(tempfile.mkdtemp(prefix="pickscore-shim-"))
    atexit.register(shutil.rmtree, shim, True)
    for package, folder in dirs.items():
        (shim / package).symlink_to(root / folder, target_is_directory=True)
    sys.path.insert(0, str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(shim)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    importlib.invalidate_caches()
    for package in dirs:  # one imported earlier from elsewhere (another checkout, a wheel) would shadow ours
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]
    return {"how": "path shim", "shim": str(shim)}
