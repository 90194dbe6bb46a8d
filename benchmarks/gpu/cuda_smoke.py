#!/usr/bin/env python3
"""The runtime's own CUDA layer on a real GPU, without TensorRT: the TensorRT backend stands on
`pickscore_runtime.cuda_memory` (cuda-bindings) and `pickscore_runtime.device_arrays`, and this checks them
where TensorRT cannot be installed.

    python benchmarks/gpu/cuda_smoke.py [--json FILE]     # both parts, each in a process of its own
    python benchmarks/gpu/cuda_smoke.py --part core       # one part, in this process

core (torch cannot be imported: `sys.modules["torch"] = None`, as in a TensorRT-only process):
  copies     pinned -> device on one stream, an event, device -> pinned on a second stream waiting on it
             (1 KiB and 64 MiB; a missing wait reads device memory the first copy has not written yet)
  graph      a captured H2D + D2H graph replayed three times with new host data each time (it reads
             the pinned buffer at replay, not at capture), and capture alone running nothing
  cupy       CuPy arrays seen through device_arrays (DLPack and the CUDA array interface: same pointer,
             shape, dtype; a strided view refused); a CuPy producer still writing on its own stream read
             after waiting on the stream its interface names, and through DLPack's stream argument
  cupy-graph a graph of copy -> CuPy kernel -> copy on our stream, replayed with new host data
torch (torch allowed):
  dlpack     a torch producer still writing (no synchronize), on the current stream and on a side stream,
             handed over through `device_view(t, stream=ours)`: DLPack's stream contract (torch's own
             `__cuda_array_interface__` is version 2 and names no stream, so device_view takes DLPack first)
  grad       CUDA tensors with requires_grad (a leaf, and a generator-like output): is_device_array,
             the backends' input check (array_info) and device_view take them in place, without raising

Each check is ok, failed (with the error) or skipped (with why: no CuPy, no usable GPU...). Without a
usable NVIDIA GPU a part reports "skipped: no NVIDIA GPU usable here (the reason)" and exits 0. Exit 1
when a check failed. The JSON (--json) holds every check, the device, and the versions used.
Not run on a GPU yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from project_path import ensure_project  # noqa: E402 - the project is importable only after this

PARTS = ("core", "torch")
BIG = 64 * 2**20  # bytes: large enough that a copy not ordered after the one before it reads unwritten memory


class Skip(Exception):
    """A check that cannot run here, and why."""


def run_checks(checks: list[tuple[str, Callable[[], str]]]) -> list[dict[str, Any]]:
    out = []
    for name, check in checks:
        t0 = time.perf_counter()
        try:
            detail, status = check(), "ok"
        except Skip as e:
            detail, status = str(e), "skipped"
        except Exception as e:  # noqa: BLE001 - a failed check is a result; the others still run
            detail, status = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}", "failed"
        out.append({"name": name, "status": status, "detail": detail, "seconds": round(time.perf_counter() - t0, 3)})
        print(f"[cuda-smoke] {name}: {status}: {detail.splitlines()[0] if detail else ''}", flush=True)
    return out


def usable_device() -> Any:
    """The current device, or Skip saying why there is none (no cuda-python, no driver, no GPU)."""
    from pickscore_runtime.cuda_memory import current_device
    from pickscore_runtime.errors import PickScoreError

    try:
        return current_device()
    except PickScoreError as e:
        raise Skip(f"no NVIDIA GPU usable here ({e})") from None


def cupy_or_skip() -> Any:
    try:
        import cupy
    except ImportError as e:
        raise Skip(f"CuPy is not installed ({e})") from None
    return cupy


def expect_equal(got: Any, want: Any, what: str) -> None:
    import numpy as np

    if not np.array_equal(got, want):
        bad = int(np.count_nonzero(np.asarray(got) != np.asarray(want)))
        raise AssertionError(f"{what}: {bad} of {np.asarray(want).size} values differ (first got {np.asarray(got).ravel()[:4]}, "
                             f"want {np.asarray(want).ravel()[:4]})")


# ---- core: torch blocked --------------------------------------------------------------------------------
def check_copies() -> str:
    import numpy as np

    from pickscore_runtime.cuda_memory import DeviceBuffer, Event, PinnedArray, Stream, free_all

    said = []
    for nbytes in (1024, BIG):
        n = nbytes // 4
        src, dst, dev = PinnedArray((n,), np.float32), PinnedArray((n,), np.float32), DeviceBuffer(nbytes)
        first, second, copied = Stream(), Stream(), Event()
        start, end = Event(timing=True), Event(timing=True)
        try:
            src.array[:] = np.random.default_rng(nbytes).standard_normal(n, dtype=np.float32)
            dst.array[:] = 0
            start.record(first)
            first.copy_to_device(dev.ptr, src.ptr, nbytes)
            end.record(first)
            copied.record(first)
            second.wait(copied)
            second.copy_to_host(dst.ptr, dev.ptr, nbytes)
            second.synchronize()
            expect_equal(dst.array, src.array, f"{nbytes} bytes back through the second stream")
            seconds = end.seconds_since(start)
            said.append(f"{nbytes} B: H2D {nbytes / max(seconds, 1e-9) / 1e9:.1f} GB/s")
        finally:
            free_all(start, end, copied, first, second, dev, dst, src)
    return "; ".join(said)


def check_graph() -> str:
    import numpy as np

    from pickscore_runtime.cuda_memory import DeviceBuffer, Graph, PinnedArray, Stream, free_all

    n = 2**20
    src, dst, dev, stream = PinnedArray((n,), np.float32), PinnedArray((n,), np.float32), DeviceBuffer(4 * n), Stream()
    graph = None
    try:
        src.array[:] = -1
        dst.array[:] = 0

        def enqueue(s: Any) -> None:
            s.copy_to_device(dev.ptr, src.ptr, 4 * n)
            s.copy_to_host(dst.ptr, dev.ptr, 4 * n)

        graph = Graph(stream, enqueue)
        stream.synchronize()
        expect_equal(dst.array, np.zeros(n, np.float32), "after capture alone (nothing may have run)")
        for k in range(1, 4):
            src.array[:] = np.arange(n, dtype=np.float32) * k
            graph.launch(stream)
            stream.synchronize()
            expect_equal(dst.array, src.array, f"replay {k}")
        return "capture ran nothing; 3 replays each read the host data of their time"
    finally:
        free_all(graph, stream, dev, dst, src)


def check_cupy_views() -> str:
    import numpy as np

    from pickscore_runtime.cuda_memory import PinnedArray, Stream, free_all
    from pickscore_runtime.device_arrays import device_view, from_cuda_array_interface, is_device_array

    cupy = cupy_or_skip()
    a = cupy.arange(3 * 4 * 5, dtype=cupy.float32).reshape(3, 4, 5)
    assert is_device_array(a), "is_device_array(a CuPy array) is False"
    for how, view in (("dlpack", device_view(a)), ("cuda array interface", from_cuda_array_interface(a))):
        assert (view.ptr, view.shape, str(view.dtype), view.device) == (a.data.ptr, a.shape, "float32", "cuda"), (how, view)
    try:
        device_view(a[:, :, ::2])
    except ValueError:
        pass
    else:
        raise AssertionError("a strided CuPy view was taken as contiguous")

    # A producer still writing on a stream of its own: the reader orders itself after that stream.
    n = BIG // 4
    out, ours = PinnedArray((n,), np.float32), Stream()
    said = []
    try:
        for how in ("cuda array interface stream", "dlpack stream argument"):
            producer = cupy.cuda.Stream(non_blocking=True)
            with producer:
                b = cupy.zeros(n, dtype=cupy.float32)
                for _ in range(30):  # keep the producer busy well past the hand-off
                    b = b * 1.0000001 + 0.5
                b += 1
                still_running = not producer.done
                if how.startswith("cuda"):
                    view = from_cuda_array_interface(b)
                    if view.stream is None:
                        raise AssertionError("CuPy's interface named no stream for a non-default-stream producer")
                    ours.wait_for_stream(view.stream)
                else:
                    view = device_view(b, stream=ours.handle)
            out.array[:] = 0
            ours.copy_to_host(out.ptr, view.ptr, 4 * n)
            ours.synchronize()
            expect_equal(out.array, cupy.asnumpy(b), how)
            said.append(f"{how}: ok (producer still running at hand-off: {still_running})")
    finally:
        free_all(ours, out)
    return "; ".join(said)


def check_cupy_graph() -> str:
    import numpy as np

    from pickscore_runtime.cuda_memory import Graph, PinnedArray, Stream, free_all

    cupy = cupy_or_skip()
    n = 2**20
    src, dst, stream = PinnedArray((n,), np.float32), PinnedArray((n,), np.float32), Stream()
    x, y = cupy.empty(n, cupy.float32), cupy.empty(n, cupy.float32)
    external = cupy.cuda.ExternalStream(stream.handle)
    with external:
        cupy.multiply(x, 2, out=y)  # compiled and loaded before the capture
    stream.synchronize()
    graph = None
    try:
        def enqueue(s: Any) -> None:
            s.copy_to_device(x.data.ptr, src.ptr, 4 * n)
            with external:
                cupy.multiply(x, 2, out=y)
            s.copy_to_host(dst.ptr, y.data.ptr, 4 * n)

        graph = Graph(stream, enqueue)
        for k in range(1, 4):
            src.array[:] = np.arange(n, dtype=np.float32) + k
            graph.launch(stream)
            stream.synchronize()
            expect_equal(dst.array, src.array * 2, f"replay {k}")
        return "copy -> kernel -> copy replayed 3 times with new host data"
    finally:
        free_all(graph, stream, dst, src)


def core() -> dict[str, Any]:
    device = usable_device()
    checks = run_checks([("copies: pinned -> device -> pinned over two streams with events", check_copies),
                         ("graph: capture and replay with changing host data", check_graph),
                         ("cupy: views through device_arrays and stream hand-off", check_cupy_views),
                         ("cupy-graph: copy -> CuPy kernel -> copy captured and replayed", check_cupy_graph)])
    if sys.modules.get("torch") is not None:
        checks.append({"name": "torch-free", "status": "failed", "detail": "torch was imported", "seconds": 0})
    return {"device": dataclasses.asdict(device), "checks": checks}


# ---- torch ----------------------------------------------------------------------------------------------
def torch_cuda() -> Any:
    try:
        import torch
    except ImportError as e:
        raise Skip(f"torch is not installed ({e})") from None
    if not torch.cuda.is_available():
        raise Skip(f"torch {torch.__version__} cannot use the GPU")
    return torch


def busy(torch: Any) -> None:
    """Keep the current torch stream busy for a while (tens of ms), so what follows is still pending."""
    torch.cuda._sleep(200_000_000)


def check_dlpack_handoff() -> str:
    import numpy as np

    from pickscore_runtime.cuda_memory import PinnedArray, Stream, free_all
    from pickscore_runtime.device_arrays import device_view

    torch = torch_cuda()
    n = BIG // 4
    out, ours = PinnedArray((n,), np.float32), Stream()
    said = []
    try:
        for how, value in (("current stream", 7.0), ("side stream", 5.0)):
            producer = torch.cuda.Stream() if how == "side stream" else torch.cuda.current_stream()
            t = torch.zeros(n, device="cuda")
            producer.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(producer):
                busy(torch)
                t.fill_(value)
                pending = not producer.query()
                view = device_view(t, stream=ours.handle)  # the producer's current stream orders our stream
            out.array[:] = 0
            ours.copy_to_host(out.ptr, view.ptr, 4 * n)
            ours.synchronize()
            expect_equal(out.array, np.full(n, value, np.float32), how)
            said.append(f"{how}: ok (producer still running at hand-off: {pending})")
            torch.cuda.synchronize()
    finally:
        free_all(ours, out)
    return "; ".join(said)


def check_requires_grad() -> str:
    from pickscore_runtime.device_arrays import device_view, is_device_array

    from pickscore_runtime.backends.base import array_info

    torch = torch_cuda()
    x = torch.rand(2, 3, 224, 224, device="cuda", requires_grad=True)
    y = x * 2  # a non-leaf with a grad_fn, as a generator's output is
    said = []
    for name, t in (("leaf", x), ("non-leaf", y)):
        assert is_device_array(t) is True, f"is_device_array({name} requires_grad tensor) is not True"
        info = array_info(t)
        assert (info.shape, info.dtype) == (tuple(t.shape), "float32"), (name, info)
        view = device_view(t)
        assert view.ptr == t.data_ptr() and view.shape == tuple(t.shape), (name, view)
        said.append(f"{name}: viewed in place")
    return "; ".join(said)


def torch_part() -> dict[str, Any]:
    device = usable_device()
    checks = run_checks([("dlpack: hand-off from an unsynchronised torch producer", check_dlpack_handoff),
                         ("grad: requires_grad CUDA tensors", check_requires_grad)])
    torch = sys.modules.get("torch")
    versions = {"torch": torch.__version__, "torch_cuda": torch.version.cuda} if torch else {}
    return {"device": dataclasses.asdict(device), "checks": checks, "versions": versions}


# ---- running the parts --------------------------------------------------------------------------------
def run_part(part: str) -> dict[str, Any]:
    if part == "core":  # before anything of the project loads: `import torch` raises ImportError from here on
        sys.modules["torch"] = None  # type: ignore[assignment]
        sys.modules["transformers"] = None  # type: ignore[assignment]
    project = ensure_project()
    t0 = time.perf_counter()
    try:
        result = {"core": core, "torch": torch_part}[part]()
    except Skip as e:
        result = {"checks": [], "why": str(e)}
    checks = result["checks"]
    failed = [c for c in checks if c["status"] == "failed"]
    status = "failed" if failed else "ok" if any(c["status"] == "ok" for c in checks) else "skipped"
    why = result.pop("why", "") or ("; ".join(c["name"].split(":")[0] for c in failed) + " failed" if failed else
                                    "; ".join(f"{c['name'].split(':')[0]}: {c['detail']}" for c in checks) if status == "skipped" else "")
    return {"part": part, "status": status, "why": why, "project": project, **result,
            "seconds": round(time.perf_counter() - t0, 2)}


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("cuda-python", "cuda-bindings", "cupy-cuda13x", "cupy-cuda12x", "cupy", "numpy", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=PARTS, default=None, help="run one part in this process (default: each in its own)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the results here")
    p.add_argument("--timeout-s", type=float, default=120, help="the most each part may take (default 120)")
    args = p.parse_args(argv)
    if args.part:
        report = run_part(args.part)
    else:
        parts = []
        for part in PARTS:
            with tempfile.TemporaryDirectory(prefix="pickscore-smoke-") as tmp:
                report_file = Path(tmp) / "part.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--json", str(report_file)]
                try:
                    done = subprocess.run(cmd, timeout=args.timeout_s, env=os.environ.copy())
                    parts.append(json.loads(report_file.read_text()))
                except (subprocess.TimeoutExpired, OSError, ValueError) as e:
                    code = getattr(locals().get("done"), "returncode", None)
                    parts.append({"part": part, "status": "failed", "checks": [],
                                  "why": f"{type(e).__name__}: {e}" + (f" (exit {code})" if code is not None else "")})
        statuses = {r["status"] for r in parts}
        status = "failed" if "failed" in statuses else "ok" if "ok" in statuses else "skipped"
        reasons = list(dict.fromkeys(r["why"] for r in parts if r["why"]))  # both parts skipped for one reason: said once
        report = {"status": status, "why": "; ".join(reasons),
                  "parts": parts, "versions": versions()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"[cuda-smoke] {report.get('part', 'both parts')}: {report['status']}: {report['why'] or 'every check ran'}", flush=True)
    return 1 if report["status"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
