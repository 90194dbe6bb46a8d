"""Backends: one protocol (`base.Backend`), one registry of data (`registry.BACKENDS`), `create_backend`."""

from .base import Backend, BackendBase, PendingEmbeddings
from .registry import AUTO_ORDER, BACKENDS, PRECISIONS, BackendInfo, GateWarning, backend_info, create_backend, open_backend, resolve_precision, runnable_backend, select_backend

__all__ = ["AUTO_ORDER", "BACKENDS", "PRECISIONS", "Backend", "BackendBase", "BackendInfo", "PendingEmbeddings", "GateWarning",
           "backend_info", "create_backend", "open_backend", "resolve_precision", "runnable_backend", "select_backend"]
