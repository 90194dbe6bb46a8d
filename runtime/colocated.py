"""`pickscore bench --colocate`: what the reward costs a trainer that shares its GPU, measured against a
stand-in for the trainer's step.

The stand-in (`stand_in_trainer`) is a fixed torch workload: C = A @ B with A, B and C bf16 [8192, 8192]
(MATMUL_SIZE; 1.1 TFLOP per iteration, 384 MiB of device memory), looped on a CUDA stream of its own in a
background thread of the bench's process, its stream synchronized after every matmul (one iteration). That
is how a trainer's step runs beside a reward in its process: same CUDA context, streams of their own, one GIL
(the stand-in holds it only to launch; its waits release it, spinning a CPU core as CUDA's default sync does).
For every bench cell, after the cell's usual (uncontended) timing, the bench measures

- `workload_alone_iters_per_s`: the stand-in's iterations/s on its own for ALONE_SECONDS, the reward's
  backends open but idle, just before the cell (so a GPU whose clocks drift is compared with itself);
- `workload_colocated_iters_per_s`: its iterations/s while the cell's calls run (at least ALONE_SECONDS
  of them, after one warm-up call under contention);
- `colocated_slowdown` = alone / colocated: 1.0 leaves the trainer untouched, 1.5 makes its step take
  half as long again (`slowdown`);
- `colocated_items_per_s`: the cell's own items/s under that contention (its `items_per_s` stays the
  uncontended figure, comparable with runs without --colocate).

Only the rate arithmetic and the threading (`Workload`, with a CPU step) run in CI. The stand-in itself
needs a CUDA build of torch and an NVIDIA GPU: NEVER RUN ON A GPU YET. `check_colocate` refuses, before
anything loads, where it cannot run.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, ContextManager, Iterator

from .errors import PickScoreError
from .optional import findable, require

MATMUL_SIZE = 8192  # the stand-in's square matmul: 2 * 8192**3 = 1.1 TFLOP per iteration, ~1.6 ms on an H100
MATMUL_DTYPE = "bf16"  # what trainers of diffusion models compute in
ALONE_SECONDS = 0.5  # how long the stand-in is timed alone before each cell, and the least its contended window lasts

Mark = tuple[int, float]  # (iterations completed, time.perf_counter())


class WorkloadError(PickScoreError):
    """The stand-in workload itself failed (its step raised)."""


def colocate_unavailable() -> str | None:
    """Why the stand-in trainer cannot run here (None: it can): it needs an NVIDIA GPU and a CUDA build of
    torch. The device is looked for without importing anything; torch is imported only where one is found."""
    from .backends.registry import no_nvidia_gpu

    reason = no_nvidia_gpu()
    if reason is not None:
        return reason
    if not findable("torch"):
        return "torch is not installed (install a CUDA build of torch)"
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} cannot use the GPU (a CPU-only build, or a driver mismatch)"
    return None


def check_colocate() -> None:
    """PickScoreError where --colocate cannot run: called before the bench loads anything."""
    reason = colocate_unavailable()
    if reason is not None:
        raise PickScoreError(f"bench --colocate runs a torch workload on the GPU beside the reward (a stand-in for "
                             f"the trainer's step) and needs a CUDA build of torch on an NVIDIA GPU: {reason}")


def iterations_per_s(start: Mark, end: Mark) -> float | None:
    """Iterations completed between two marks, per second of the time between them (3 decimals); None for an
    empty window."""
    (n0, t0), (n1, t1) = start, end
    return round((n1 - n0) / (t1 - t0), 3) if t1 > t0 else None


def slowdown(alone: float | None, colocated: float | None) -> float | None:
    """How many times longer a workload iteration takes beside the reward than alone: alone / colocated
    (3 decimals; 1.0 untouched). None where either rate is missing, or the workload finished no iteration
    in its contended window (starved: slower than the window can tell)."""
    if not alone or not colocated:
        return None
    return round(alone / colocated, 3)


class Workload:
    """`step` called in a loop in a background thread while `running()`, each completed call counted in
    `iterations`. `context` (called in that thread) is entered around the loop: the stand-in's CUDA stream,
    which is per thread. A step that raises stops the loop; the next mark, or the end of `running()`,
    raises WorkloadError with it."""

    def __init__(self, step: Callable[[], object], about: dict[str, Any] | None = None,
                 context: Callable[[], ContextManager[Any]] = contextlib.nullcontext):
        self._step, self._context = step, context
        self.about = about or {}
        self.iterations = 0  # written by the loop's thread only
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self, first: threading.Event) -> None:
        try:
            with self._context():
                while not self._stop.is_set():
                    self._step()
                    self.iterations += 1
                    first.set()
        except BaseException as e:  # noqa: BLE001 - handed to the measuring thread
            self._error = e
        finally:
            first.set()

    def check(self) -> None:
        if self._error is not None:
            raise WorkloadError(f"the colocated workload failed: {type(self._error).__name__}: {self._error}") \
                from self._error

    def mark(self) -> Mark:
        """(iterations so far, now); WorkloadError if the loop has failed."""
        self.check()
        return self.iterations, time.perf_counter()

    @contextlib.contextmanager
    def running(self) -> Iterator["Workload"]:
        """The loop runs inside this block (from its first completed iteration on)."""
        if self._thread is not None:
            raise RuntimeError("the workload is already running")
        self._stop.clear()
        first = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(first,), name="pickscore-colocated-workload",
                                        daemon=True)
        self._thread.start()
        try:
            first.wait()
            self.check()
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def alone(self, seconds: float = ALONE_SECONDS) -> float | None:
        """Its iterations/s with nothing else measured, over `seconds`."""
        with self.running():
            start = self.mark()
            time.sleep(seconds)
            return iterations_per_s(start, self.mark())


def stand_in_trainer(size: int = MATMUL_SIZE) -> Workload:
    """The stand-in for a trainer's step on the current CUDA device (see the module's docstring). Its matrices
    come from a generator of its own (torch's global RNG is not drawn from), and one matmul runs before it is
    returned, so its cuBLAS workspace is allocated before the bench measures anything. Never run on a GPU yet."""
    torch = require("torch", "bench --colocate")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[MATMUL_DTYPE]
    device = torch.device("cuda", torch.cuda.current_device())
    stream = torch.cuda.Stream(device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    with torch.cuda.device(device), torch.cuda.stream(stream), torch.no_grad():
        a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        c = torch.empty_like(a)
        torch.matmul(a, b, out=c)
    stream.synchronize()

    def context() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for scope in (torch.cuda.device(device), torch.cuda.stream(stream), torch.no_grad()):
            stack.enter_context(scope)
        return stack

    def step() -> None:
        torch.matmul(a, b, out=c)
        stream.synchronize()  # one iteration = one matmul done; releases the GIL while it waits

    about = {"what": f"C = A @ B, {MATMUL_DTYPE} [{size}, {size}], on its own CUDA stream in a background thread, "
                     "its stream synchronized after each matmul (one iteration)",
             "tflop_per_iteration": round(2 * size**3 / 1e12, 3), "memory_mb": round(3 * size * size * 2 / 2**20),
             "device": torch.cuda.get_device_name(device)}
    return Workload(step, about, context)
