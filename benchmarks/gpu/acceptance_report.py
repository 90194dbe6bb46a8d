"""What benchmarks/gpu/acceptance.py reads and writes: the judges of what the steps wrote (the CUDA smoke's
report, the gpu tests' junit XML, verify reports, bench rows and the targets), the machine's description
(package versions, nvidia-smi), and the Report: summary.json, summary.md, bench.jsonl and results.tar.gz.

Imported by acceptance.py once it has put this folder on sys.path and before ensure_project() has run: the
project (pickscore_runtime) is imported inside the functions that need it, never at module level.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from acceptance_steps import StepResult

# Targets on one H100/H200 (not results), vision tower, fp16, batch >= 128: (backend, needs compile, img/s).
TARGETS = (("tensorrt", False, 2000.0), ("torch-cuda", True, 1500.0))
TARGET_BATCH = 128
PACKAGES = re.compile(r"^(torch|triton|transformers|tokenizers|onnx|onnxscript|onnxruntime(-gpu)?|numpy|pillow|pytest|"
                      r"cuda-(python|bindings|core)|cupy(-cuda\d+x)?|tensorrt(-cu\d+)?(-bindings|-libs)?|"
                      r"nvidia-(cudnn|cublas|cuda-runtime|nccl)-cu\d+|setuptools)$")


# ---- what each step wrote ------------------------------------------------------------------------------
def pytest_outcome(xml: Path) -> dict[str, Any]:
    """Counts of a pytest junit XML, and each skip reason with how many tests it skipped."""
    counts, reasons = Counter(), Counter()
    for case in ET.parse(xml).getroot().iter("testcase"):
        skipped = case.find("skipped")
        if skipped is not None:
            counts["skipped"] += 1
            reasons[(skipped.get("message") or skipped.text or "no reason given").strip()] += 1
        elif case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        else:
            counts["passed"] += 1
    return {"passed": counts["passed"], "failed": counts["failed"], "skipped": counts["skipped"],
            "skip_reasons": dict(reasons)}


def judge_gpu_tests(xml: Path) -> Callable[[StepResult], StepResult]:
    def judge(result: StepResult) -> StepResult:
        if result.status == "timeout":
            return result
        try:
            outcome = pytest_outcome(xml)
        except (OSError, ET.ParseError) as e:
            return StepResult(result.name, "failed", why=f"no pytest report ({e}); {result.why}",
                              returncode=result.returncode, log=result.log)
        if result.status == "ok" and outcome["passed"] == 0:
            reasons = "; ".join(f"{why} ({n})" for why, n in outcome["skip_reasons"].items()) or "none collected"
            result = StepResult(result.name, "failed", why=f"every gpu test skipped: {reasons}",
                                returncode=result.returncode, log=result.log)
        elif result.status == "ok":
            result.why = f"{outcome['passed']} passed, {outcome['skipped']} skipped"
        return result
    return judge


def judge_smoke(report: Path, skip_is_failure: bool) -> Callable[[StepResult], StepResult]:
    def judge(result: StepResult) -> StepResult:
        try:
            smoke = json.loads(report.read_text())
        except (OSError, ValueError) as e:
            return StepResult(result.name, "failed" if result.status != "timeout" else "timeout",
                              why=f"no smoke report ({e}); {result.why}", returncode=result.returncode, log=result.log)
        if smoke["status"] == "skipped":
            status = "failed" if skip_is_failure else "skipped"
            return StepResult(result.name, status, why=f"every check skipped: {smoke['why']}",
                              returncode=result.returncode, log=result.log)
        if smoke["status"] == "failed":
            result.status, result.why = "failed", smoke["why"]
        return result
    return judge


def smoke_summary(staging: Path) -> dict[str, Any] | None:
    try:
        smoke = json.loads((staging / "smoke.json").read_text())
    except (OSError, ValueError):
        return None
    return {"status": smoke["status"], "why": smoke["why"], "versions": smoke.get("versions"),
            "checks": [{"part": p["part"], **{k: c[k] for k in ("name", "status", "seconds")},
                        "detail": c["detail"].splitlines()[0] if c["detail"] else ""}
                       for p in smoke.get("parts", []) for c in p.get("checks", [])],
            "torch": next((p["versions"] for p in smoke.get("parts", []) if p.get("versions")), None)}


def bench_rows(staging: Path) -> list[dict[str, Any]]:
    """Every bench row written so far (the JSON-lines files, read line by line: a cut-off last line is left out)."""
    rows = []
    for path in sorted(staging.glob("bench-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def verify_summary(staging: Path, runnable: list[str]) -> list[dict[str, Any]]:
    rows = []
    for backend in runnable:
        path = staging / f"verify-{backend}.json"
        if not path.is_file():
            continue
        reports = json.loads(path.read_text())
        for r in reports if isinstance(reports, list) else [reports]:
            rows.append({k: r.get(k) for k in ("backend", "precision", "passed", "failures", "max_abs_score_diff",
                                              "max_abs_prob_diff", "min_cosine_image", "min_cosine_text", "reference_device")})
    return rows


def targets(rows: list[dict[str, Any]], gpu: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The GPU targets, judged on an H100 or H200 only (elsewhere: information)."""
    name = (gpu or {}).get("name") or ""
    applies = "H100" in name or "H200" in name
    out = []
    for backend, compiled, goal in TARGETS:
        what = f"{backend}{' compiled' if compiled else ''} fp16 vision >= {goal:.0f} img/s at batch >= {TARGET_BATCH} (one H100/H200)"
        found = [r for r in rows if (r["backend"], r["precision"], r["stage"]) == (backend, "fp16", "vision")
                 and not r.get("error") and r["batch_size"] >= TARGET_BATCH
                 and (not compiled or "compile=true" in (r.get("options") or ""))]
        if not found:
            out.append({"target": what, "status": "not measured", "measured": None, "met": None,
                        "note": f"no {backend} fp16 vision row at batch >= {TARGET_BATCH}"})
            continue
        best = max(found, key=lambda r: r["items_per_s"])
        out.append({"target": what, "status": "measured", "measured": best["items_per_s"], "batch": best["batch_size"],
                    "options": best.get("options") or "", "met": best["items_per_s"] >= goal if applies else None,
                    "note": "" if applies else f"this is a {name or 'machine without a named GPU'}: information only"})
    return out


def bench_errors(rows: list[dict[str, Any]]) -> list[str]:
    from pickscore_runtime.bench import row_label

    return [f"{row_label(r)} {r['stage']} batch {r['batch_size']}: {r['error']}" for r in rows if r.get("error")]


# ---- the machine ---------------------------------------------------------------------------------------
def packages() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if PACKAGES.match(name):
            found[name] = dist.version
    return dict(sorted(found.items()))


def nvidia_smi(staging: Path) -> dict[str, Any]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"found": False, "why": "nvidia-smi is not on PATH"}
    out: dict[str, Any] = {"found": True, "path": exe}
    try:
        full = subprocess.run([exe], capture_output=True, text=True, timeout=30)
        (staging / "nvidia-smi.txt").write_text(full.stdout + full.stderr)
        query = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total,compute_cap,power.limit,clocks.max.sm",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return {**out, "why": f"{type(e).__name__}: {e}"}
    header = re.search(r"CUDA Version:\s*([\d.]+)", full.stdout)
    out["driver_cuda"] = header.group(1) if header else None
    keys = ("name", "driver", "memory", "compute_capability", "power_limit", "max_sm_clock")
    out["gpus"] = [dict(zip(keys, (x.strip() for x in line.split(",")))) for line in query.stdout.splitlines() if line.strip()]
    if query.returncode != 0:
        out["why"] = (query.stdout + query.stderr).strip()[-300:]
    return out


def probe(fn: Callable[..., Any], *args: Any) -> Any:
    """What a description of the machine returns, or {"error": ...}: a probe that fails does not stop the run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


# ---- the report ----------------------------------------------------------------------------------------
class Report:
    """summary.json (+ summary.md, bench.jsonl, results.tar.gz) under `out`, rewritten on every `save()`."""

    def __init__(self, out: Path, staging: Path, data: dict[str, Any], t0: float):
        self.out, self.staging, self.data, self.t0 = out, staging, data, t0

    def save(self, **changes: Any) -> None:
        from pickscore_runtime.durable import atomic_write  # the project is importable by now (ensure_project)

        def write(name: str, text: str) -> None:
            atomic_write(self.out / name, [text.encode()])

        self.data.update(changes)
        rows = bench_rows(self.staging)
        self.data.update(seconds=round(time.monotonic() - self.t0, 1), bench_rows=len(rows),
                         updated_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         smoke=smoke_summary(self.staging))
        write("summary.json", json.dumps(self.data, indent=2, default=str) + "\n")
        if rows:
            write("bench.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        self.pack()
        try:
            text = markdown(self.data, rows)
        except Exception as e:  # noqa: BLE001 - summary.json holds it all; the table must not stop the run
            text = f"# GPU acceptance\n\nsummary.md could not be written ({type(e).__name__}: {e}); see summary.json\n"
        write("summary.md", text)

    def pack(self) -> None:
        tmp = self.out / ".results.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(self.staging.rglob("*")):
                if path.is_file() and not path.name.startswith("."):  # a half-written file is renamed into place later
                    try:
                        tar.add(path, arcname=str(path.relative_to(self.staging)))
                    except OSError:
                        pass
        os.replace(tmp, self.out / "results.tar.gz")


def number(x: Any, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    from pickscore_runtime.bench import markdown_table

    gpu = report.get("gpu") or {}
    lines = [f"# GPU acceptance: {gpu.get('name') or 'no GPU'}", "",
             f"{report['started_utc']}: {report['state']}, {report.get('mode')}, {report.get('seconds', 0):.0f} s of a "
             f"{report['budget_s']:.0f} s budget; passed: {report.get('passed')}. "
             + ("RANDOM WEIGHTS: scores are meaningless; speed and numerics gates are real." if report.get("random_weights") else ""),
             "", "| step | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['why']} |" for s in report["steps"]]
    lines += ["", "Skipped:", ""] + [f"- {s['what']}: {s['why']}" for s in report["skipped"]] + [""]
    smoke = report.get("smoke")
    if smoke:
        lines += [f"CUDA smoke: {smoke['status']} {smoke['why']}", ""]
        lines += [f"- {c['part']}: {c['name']}: {c['status']} {c['detail']}" for c in smoke["checks"]] + [""]
    if report.get("gpu_tests"):
        t = report["gpu_tests"]
        lines += [f"gpu tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped", ""]
        lines += [f"- skipped ({n}): {why}" for why, n in t["skip_reasons"].items()] + [""]
    if report.get("verify"):
        lines += ["| backend | precision | passed | max abs Δscore | max abs Δprob | min cosine image / text |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {v['backend']} | {v['precision']} | {v['passed']} | {number(v.get('max_abs_score_diff'))} | "
                  f"{number(v.get('max_abs_prob_diff'))} | {number(v.get('min_cosine_image'), '.6f')} / "
                  f"{number(v.get('min_cosine_text'), '.6f')} |" for v in report["verify"]] + [""]
    if rows:
        lines += ["## Bench", "", markdown_table({"rows": rows}), ""]
    if report.get("bench_errors"):
        lines += ["Bench cells that failed:", ""] + [f"- {e}" for e in report["bench_errors"]] + [""]
    if report.get("targets"):
        lines += ["## Targets (one H100/H200)", ""]
        lines += [f"- {t['target']}: {number(t.get('measured'), '.0f')} (batch {t.get('batch', '-')}{' ' + t['options'] if t.get('options') else ''}), "
                  f"met: {t.get('met')} {t.get('note', '')}" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def packed_results(report: dict[str, Any], staging: Path, runnable: list[str], gpu: dict[str, Any] | None,
                   strict: bool) -> dict[str, Any]:
    """What the steps wrote, read into the report, and the verdict."""
    rows = bench_rows(staging)
    xml = staging / "gpu-tests.xml"
    out = {"verify": verify_summary(staging, runnable), "targets": targets(rows, gpu) if runnable else [],
           "bench_errors": bench_errors(rows), "gpu_tests": pytest_outcome(xml) if xml.is_file() else None}
    failed = [f"{s['name']} ({s['status']})" for s in report["steps"] if s["status"] in ("failed", "timeout")]
    failed += [f"verify {v['backend']}/{v['precision']}" for v in out["verify"] if not v["passed"]]
    failed += [f"bench: {len(out['bench_errors'])} cell(s) failed"] if out["bench_errors"] else []
    missed = [t["target"] for t in out["targets"] if t.get("met") is False]
    return {**out, "failed": failed, "targets_missed": missed, "passed": not failed and not (strict and missed)}
