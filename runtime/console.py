"""What every command shares with its user: exit codes and messages on stderr.

A leaf module (it imports nothing of ours), so the CLI, the server's command, the Ray job's command and the
backends that report progress (a TensorRT build) all say things the same way without importing each other.
"""

from __future__ import annotations

import sys

EXIT_OK, EXIT_UNSCORED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def say(msg: str) -> None:
    """One line for the user, on stderr (stdout carries results), flushed at once."""
    print(msg, file=sys.stderr, flush=True)
