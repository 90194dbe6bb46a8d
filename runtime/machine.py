"""What a measurement ran on and with: the machine (CPU model, SIMD flags, cores, memory; the GPU when one
was used) and the code (this checkout's git commit, else the package version).

`pickscore bench`, `pickscore verify` and the scripts in benchmarks/ record them beside their numbers:
the same VM name has come with and without AVX-512 VNNI/BF16, which moves int8 and bf16 several-fold,
and a number without the commit that produced it cannot be reproduced. Nothing here imports torch or
initialises CUDA: the GPU is described only through what a cuda backend already loaded.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

# The flags int8 and bf16 kernels hinge on (AVX2 alone: u8 x s8 in three instructions with 16-bit sums;
# VNNI: one; BF16/AMX: native bf16).
SIMD_FLAGS = {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; (platform.processor(), empty) where there is none."""
    cpu, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return cpu, flags
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    return cpu, flags


def simd_flags() -> list[str]:
    """This CPU's flags among SIMD_FLAGS, sorted: what a measurement or a gate verdict on CPU kernels depends on."""
    return sorted(cpu_model_and_flags()[1] & SIMD_FLAGS)


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        return round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        return None


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """CPU model, logical cores (and those this process may use), the threads a run was given, memory,
    Python, ONNX Runtime, the OS, and the SIMD flags that decide int8 / bf16 speed (`simd`)."""
    import onnxruntime

    cpu = cpu_model_and_flags()[0]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "threads": threads or os.cpu_count(),
            "memory_gb": _memory_gb(), "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "platform": platform.platform(), "simd": simd_flags()}


def gpu_info() -> dict[str, Any] | None:
    """Name, compute capability and memory of the current GPU, through cuda-python, else through torch when
    something already imported it; None when neither can tell (no GPU, or nothing loaded CUDA)."""
    try:
        from .cuda_memory import current_device

        d = current_device()
        return {"name": d.name, "compute_capability": d.compute_capability,
                "memory_gb": round(d.total_memory / 2**30, 1), "via": "cuda-python"}
    except Exception:  # noqa: BLE001 - cuda-python missing or no device: try torch
        pass
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            p = torch.cuda.get_device_properties(torch.cuda.current_device())
            return {"name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                    "memory_gb": round(p.total_memory / 2**30, 1), "via": "torch"}
    except Exception:  # noqa: BLE001 - a broken CUDA setup describes no GPU
        pass
    return None


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """{"commit": the git HEAD of the checkout this package runs from, or None when it is not running from
    one (an installed wheel); "modified": whether tracked files differ from that commit (None: unknown);
    "version": the package version}. A checkout counts only if it tracks this package's own files, so a
    wheel installed into a virtualenv that sits inside some repository does not report that repository."""
    from . import __version__

    here = Path(__file__).resolve().parent
    commit = modified = None
    if _git(here, "ls-files", "--error-unmatch", "__init__.py") is not None:
        commit = _git(here, "rev-parse", "HEAD")
        status = _git(here, "status", "--porcelain", "--untracked-files=no") if commit else None
        modified = None if status is None else bool(status)
    return {"commit": commit, "modified": modified, "version": __version__}
