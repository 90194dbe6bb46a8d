"""Scale-out on Ray Data: `pickscore score --ray`, and the same as Datasets for callers' pipelines.

Importing this package does not import ray; its functions do (the `[ray]` extra):
`read_input`, `score_images`, `rank`, `score_dataset`, `work_rows` (pickscore_runtime.scale.dataset) and
`score_to_directory` (pickscore_runtime.scale.job, the resumable job behind the CLI).
"""

from __future__ import annotations

from typing import Any

_DATASET = ("read_input", "score_images", "rank", "score_dataset", "work_rows")
_JOB = ("score_to_directory", "JobOptions", "Tally")
__all__ = [*_DATASET, *_JOB]


def __getattr__(name: str) -> Any:
    if name in _DATASET:
        from . import dataset

        return getattr(dataset, name)
    if name in _JOB:
        from . import job

        return getattr(job, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
