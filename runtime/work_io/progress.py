"""A progress line for long runs: one self-rewriting stderr line (done/total, items/s, ETA) on a
terminal; silent when stderr is piped or redirected."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int | None, unit: str = "img", stream: TextIO = sys.stderr, enabled: bool | None = None,
                 every_s: float = 0.2):
        self.total, self.unit, self.stream, self.every_s = total, unit, stream, every_s
        self.enabled = stream.isatty() if enabled is None else enabled
        self.done, self.start, self._last = 0, time.monotonic(), 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > self.every_s or (self.total and self.done >= self.total)):
            self._last = now
            self.stream.write("\r" + self.line(now))
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}  {rate:.2f} {self.unit}/s"
        if self.total and rate > 0:
            text += f"  ETA {_duration(max(self.total - self.done, 0) / rate)}"
        return text

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
