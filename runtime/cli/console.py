"""The CLI's exit codes and `say`: defined once in the neutral `pickscore_runtime.console` (which the server's
and the Ray job's commands import too) and re-exported here for the CLI's modules."""

from __future__ import annotations

from ..console import EXIT_INTERNAL, EXIT_OK, EXIT_UNSCORED, EXIT_USAGE, say

__all__ = ["EXIT_INTERNAL", "EXIT_OK", "EXIT_UNSCORED", "EXIT_USAGE", "say"]
