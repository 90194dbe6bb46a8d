"""Advisory file locks (flock) that say who holds them. Used so that two exports never write one
artifacts directory, two runs never write one output, and two builds never write one engine."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from .errors import PickScoreError


class LockedError(PickScoreError):
    """Another process holds the lock."""


class FileLock:
    """An exclusive lock on `path` (created if needed, never deleted: deleting a lock file races with a
    process about to take it). `what` names the protected thing in the refusal message."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    def acquire(self, wait: bool = False, timeout_s: float | None = None) -> "FileLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if not wait or (deadline is not None and time.monotonic() > deadline):
                    holder = self.holder()
                    os.close(fd)
                    raise LockedError(f"{self.what} is in use by another process{f' ({holder})' if holder else ''}; "
                                      "wait for it to finish, or use another path") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
        self._fd = fd
        return self

    def holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
