"""ONNX Runtime sessions configured as the runtime runs them: the `onnx-*` backends open theirs with these
options, and the export package's graph probes (SmoothQuant's activation statistics) use the same, so
what is measured at export time runs as it will be served. onnxruntime is imported on first use (a
missing one is a MissingExtraError naming the extra)."""

from __future__ import annotations

import os
from typing import Any

from .optional import require_onnxruntime


def session_options(threads: int | None = None) -> Any:
    """intra-op threads (`threads`, else $PICKSCORE_THREADS, else ONNX Runtime's own choice), every graph
    optimisation on, warnings and errors only."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or int(os.environ.get("PICKSCORE_THREADS", 0)) or 0
    # ORT's own graph fusions are on; `pickscore verify` gates exactly this session configuration.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def cpu_session(model: str | os.PathLike, threads: int | None = None) -> Any:
    """An InferenceSession of the ONNX file `model` on the CPU execution provider, with `session_options`."""
    ort = require_onnxruntime()
    return ort.InferenceSession(os.fspath(model), session_options(threads), providers=["CPUExecutionProvider"])
