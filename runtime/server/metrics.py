"""Prometheus metrics of one server (or one Ray Serve replica), in a registry of its own."""

from __future__ import annotations

from typing import Any, Callable

from ..optional import require

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self) -> None:
        pc = require("prometheus_client", "/metrics", extra="server")
        self._pc = pc
        self.registry = pc.CollectorRegistry()
        r = self.registry
        self.requests = pc.Counter("pickscore_requests", "HTTP requests answered, by endpoint and status",
                                   ["endpoint", "status"], registry=r)
        self.latency = pc.Histogram("pickscore_request_seconds", "time from arrival to answer, by endpoint",
                                    ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = pc.Counter("pickscore_images", "images in answered requests, scored or failed",
                                 ["outcome"], registry=r)
        self.batch_size = pc.Histogram("pickscore_batch_size", "images per backend call (across requests)",
                                       buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = pc.Histogram("pickscore_batch_seconds", "backend time per image batch",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = pc.Gauge("pickscore_queue_depth", "requests admitted and not yet answered", registry=r)
        self.pending_images = pc.Gauge("pickscore_pending_images", "images admitted and not yet embedded", registry=r)
        self.ready = pc.Gauge("pickscore_ready", "1 when artifacts are loaded and warmed up", registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def watch(self, pending_images: Callable[[], int], text_cache: Any) -> None:
        """Read the batcher's backlog and the text cache's counters at each scrape."""
        self.pending_images.set_function(pending_images)
        counter = require("prometheus_client.core", "/metrics", extra="server").CounterMetricFamily

        class TextCacheCollector:
            def collect(self):  # noqa: ANN202 - prometheus_client's collector protocol
                yield counter("pickscore_text_cache_hits", "prompt embeddings found in the text cache", value=text_cache.hits)
                yield counter("pickscore_text_cache_misses", "prompt embeddings computed by the text tower",
                              value=text_cache.misses)

        self.registry.register(TextCacheCollector())

    def render(self) -> tuple[bytes, str]:
        return self._pc.generate_latest(self.registry), self._pc.CONTENT_TYPE_LATEST
