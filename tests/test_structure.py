"""The code's shape, checked: no import cycle inside the runtime, no private name of ours imported from
another module, and the runtime never imports the export package except through its one seam."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"pickscore_runtime": REPO / "runtime", "pickscore_export": REPO / "export", "pickscore_models": REPO / "models"}


def modules(package: str) -> dict[str, Path]:
    root = PACKAGES[package]
    return {".".join((package,) + p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
            for p in root.rglob("*.py")}


def imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement, lazy ones included."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = (base[: len(base) - node.level + 1] if node.level else []) + (node.module.split(".") if node.module else [])
            out.append((".".join(parts), [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
    return out


def test_runtime_has_no_import_cycle():
    mods = modules("pickscore_runtime")
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        for target, names, _ in imports(m, path):
            candidates = [target] + [f"{target}.{n}" for n in names]
            edges[m] |= {t for t in candidates if t in mods and t != m and not m.startswith(t + ".") and t != "pickscore_runtime"}
    cycles = []

    def visit(m: str, path: list[str], done: set[str]) -> None:
        if m in path:
            cycles.append(" -> ".join(path[path.index(m):] + [m]))
            return
        if m in done:
            return
        done.add(m)
        for t in sorted(edges[m]):
            visit(t, path + [m], done)

    done: set[str] = set()
    for m in sorted(mods):
        visit(m, [], done)
    assert not cycles, cycles


def test_no_private_name_crosses_a_module():
    offenders = []
    for package in PACKAGES:
        for m, path in modules(package).items():
            for target, names, line in imports(m, path):
                if target.split(".")[0] in PACKAGES and target != m:
                    offenders += [f"{path.relative_to(REPO)}:{line} imports {n} from {target}"
                                  for n in names if n.startswith("_") and not n.startswith("__")]
    assert not offenders, offenders


def test_runtime_reaches_export_only_through_the_seam():
    seam = REPO / "runtime" / "optional.py"
    uses = [f"{path.relative_to(REPO)}:{line}" for m, path in modules("pickscore_runtime").items() if path != seam
            for target, _, line in imports(m, path) if target.startswith("pickscore_export")]
    assert not uses, uses
    assert "pickscore_export.api" in seam.read_text()
