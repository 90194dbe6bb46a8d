"""What every command shares with its user: exit codes and messages on stderr (kept apart from the
parser so that modules the parser reaches, such as the Ray job's command, can use them without a cycle)."""

from __future__ import annotations

import sys

EXIT_OK, EXIT_UNSCORED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
