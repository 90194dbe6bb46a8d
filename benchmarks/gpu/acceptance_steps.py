"""The steps of benchmarks/gpu/acceptance.py and how they run: Step and StepResult, each step a subprocess in
its own process group under its time cap (the group killed at the cap), the `beside` steps side by side and
the rest in order, all inside the run's time budget.

Imported by acceptance.py once it has put this folder on sys.path and before ensure_project() has run: the
project (pickscore_runtime) is imported inside the functions that need it, never at module level.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from project_path import REPO

REFRESH_S = 15.0  # on_change while a step runs: a run killed mid-step leaves a summary at most this old


@dataclass
class StepResult:
    name: str
    status: str  # pending | running | ok | failed | timeout | skipped
    seconds: float = 0.0
    why: str = ""
    returncode: int | None = None
    log: str = ""


@dataclass
class Step:
    name: str
    argv: list[str]
    cap_s: float  # the most this step may take
    after: str = ""  # a step whose success this one needs
    drop_unless: dict[str, list[str]] = field(default_factory=dict)  # step -> --backends to drop if it did not succeed
    beside: bool = False  # runs side by side with the other `beside` steps, first
    judge: Callable[[StepResult], StepResult] | None = None  # reads what the step wrote; may change its status


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pickscore_runtime.cli", *args]


def step_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PICKSCORE_NO_SKIPS", None)  # gpu tests may skip; the acceptance judges the skips itself
    return env


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


RUNNING: dict[int, subprocess.Popen] = {}  # pid -> process, so a stopped run kills what it started


def start(step: Step, logs: Path) -> tuple[subprocess.Popen, Any]:
    log = open(logs / f"{step.name}.log", "w")
    log.write("$ " + shlex.join(step.argv) + "\n")
    log.flush()
    proc = subprocess.Popen(step.argv, stdout=log, stderr=subprocess.STDOUT, env=step_env(), cwd=REPO,
                            start_new_session=True)
    RUNNING[proc.pid] = proc
    return proc, log


def kill(proc: subprocess.Popen) -> None:
    """The step's whole process group: no grandchild keeps the GPU."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def ended(step: Step, proc: subprocess.Popen, log: Any, code: int | None, logs: Path) -> StepResult:
    RUNNING.pop(proc.pid, None)
    log.close()
    path = logs / f"{step.name}.log"
    tail = " | ".join(line.strip() for line in path.read_text(errors="replace").strip().splitlines()[-3:])
    if code is None:
        result = StepResult(step.name, "timeout", log=str(path),
                            why=f"stopped at its share of the time budget; run it alone: {shlex.join(step.argv)}")
    else:
        result = StepResult(step.name, "ok" if code == 0 else "failed", why="" if code == 0 else tail[-400:],
                            returncode=code, log=str(path))
    return step.judge(result) if step.judge else result


def run_steps(steps: list[Step], budget: Budget, logs: Path, say: Callable[[str], None],
              on_change: Callable[[dict[str, StepResult]], None] = lambda results: None) -> list[StepResult]:
    """Run `steps` (the `beside` ones first, side by side; then the others in order) within `budget`;
    `on_change(results)` after every change and every REFRESH_S while a step runs."""
    results = {s.name: StepResult(s.name, "pending") for s in steps}
    t0 = {}

    def finished(step: Step, result: StepResult) -> None:
        result.seconds = round(time.monotonic() - t0[step.name], 1)
        results[step.name] = result
        say(f"{step.name}: {result.status} in {result.seconds:.0f} s {result.why}")
        on_change(results)

    def run_together(group: list[tuple[Step, float]]) -> None:
        running = []
        for step, cap in group:
            t0[step.name] = time.monotonic()
            say(f"{step.name} (up to {cap:.0f} s): {shlex.join(step.argv)}")
            running.append((step, *start(step, logs), t0[step.name] + cap))
            results[step.name] = StepResult(step.name, "running")
        on_change(results)
        refreshed = time.monotonic()
        while running:
            time.sleep(0.2)
            for item in list(running):
                step, proc, log, deadline = item
                code = proc.poll()
                if code is None and time.monotonic() < deadline:
                    continue
                if code is None:
                    kill(proc)
                running.remove(item)
                finished(step, ended(step, proc, log, code, logs))
            if time.monotonic() - refreshed >= REFRESH_S:
                refreshed = time.monotonic()
                on_change(results)

    def skip(step: Step, why: str) -> None:
        t0[step.name] = time.monotonic()
        finished(step, StepResult(step.name, "skipped", why=why))

    def blocked(step: Step) -> str:
        if step.after and results.get(step.after, StepResult(step.after, "ok")).status != "ok":
            return f"{step.after} did not succeed"
        if "--backends" in step.argv and not step.argv[step.argv.index("--backends") + 1]:
            return "no backend left to bench"
        return "" if budget.left() >= 30 else "the time budget is spent"

    side_by_side = [s for s in steps if s.beside]
    queue = [s for s in steps if not s.beside]
    if side_by_side:
        run_together([(s, min(s.cap_s, budget.left())) for s in side_by_side])
    for i, step in enumerate(queue):
        for needed, specs in step.drop_unless.items():  # e.g. no engines: bench the others without TensorRT
            if needed in results and results[needed].status != "ok":
                step.argv = drop_backends(step.argv, specs)
        why = blocked(step)
        if why:
            skip(step, why)
            continue
        later = sum(min(s.cap_s, 60) for s in queue[i + 1:])  # keep something for the steps after this one
        run_together([(step, min(step.cap_s, max(budget.left() - later, budget.left() * 0.5)))])
    return [results[s.name] for s in steps]


def drop_backends(argv: list[str], specs: list[str]) -> list[str]:
    from pickscore_runtime.bench import split_backend_specs  # a spec's options hold commas of their own

    at = argv.index("--backends") + 1
    kept = [str(s) for s in split_backend_specs(argv[at]) if str(s) not in specs]
    return argv[:at] + [",".join(kept)] + argv[at + 1:]
