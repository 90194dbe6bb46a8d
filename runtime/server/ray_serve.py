"""The same app as a Ray Serve deployment: one replica per GPU (or per N CPU cores), across the nodes
of a Ray cluster, each replica a PickScoreService with its own micro-batcher behind Ray's HTTP proxy.

    from ray import serve
    from pickscore_runtime import ScorerOptions
    from pickscore_runtime.server import ServerConfig
    from pickscore_runtime.server.ray_serve import deployment
    serve.run(deployment(ServerConfig("/shared/artifacts", ScorerOptions(backend="onnx-cuda")), replicas=4), route_prefix="/")

The artifacts path must be readable on every node that runs a replica. Metrics are per replica.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from typing import Any, Callable, Iterator

from ..backends import BACKENDS
from ..optional import require
from .app import build_app
from .config import base_url
from .config import ServerConfig
from .service import PickScoreService

serve = require("ray.serve", "Ray Serve replicas (--ray)", extra="serve-ray")


@serve.ingress()  # the app is built per replica, after __init__, by __serve_build_asgi_app__
class PickScoreReplica:
    def __init__(self, config: ServerConfig):
        self.service = PickScoreService(config)

    def __serve_build_asgi_app__(self) -> Any:
        # Loaded during the replica's startup: Ray routes to a replica only once it is up, i.e. warm.
        return build_app(self.service, load_on_startup=True)

    def check_health(self) -> None:
        if self.service.state == "failed":
            raise RuntimeError(f"PickScore replica failed: {self.service.error}")


def replica_resources(config: ServerConfig, cpus: float | None, gpus: float | None) -> tuple[float, float]:
    """(CPUs, GPUs) per replica: a GPU backend takes one GPU and one core by default, a CPU one two cores."""
    on_gpu = config.scorer.backend in BACKENDS and BACKENDS[config.scorer.backend].device == "cuda"
    return (cpus if cpus is not None else (1 if on_gpu else 2)), (gpus if gpus is not None else (1 if on_gpu else 0))


def deployment(config: ServerConfig, *, replicas: int = 1, cpus: float | None = None, gpus: float | None = None,
               name: str = "pickscore") -> Any:
    """A bound Ray Serve application of `replicas` PickScore replicas."""
    cpus, gpus = replica_resources(config, cpus, gpus)
    if config.scorer.threads is None and config.scorer.workers is None and gpus == 0:
        # a replica's backend and decoders use the cores Ray gave it, not every core of the node
        config = dataclasses.replace(config, scorer=config.scorer.replace(threads=max(1, int(cpus)), workers=max(1, int(cpus))))
    return serve.deployment(
        PickScoreReplica, name=name, num_replicas=replicas, ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
        # the replica's own bounded queue answers 503; Ray holds at most as many more in front of it
        max_ongoing_requests=config.max_queue, max_queued_requests=config.max_queue,
        graceful_shutdown_timeout_s=config.drain_timeout_s, max_constructor_retry_count=1,
    ).bind(config)


def serve_on_ray(config: ServerConfig, address: str, *, host: str, port: int, replicas: int = 1,
                 replica_cpus: float | None = None, replica_gpus: float | None = None, ray_cpus: int | None = None,
                 object_store_mb: int | None = None, progress: Callable[[str], None] = print) -> int:
    """Run the deployment on Ray (`address` "local" starts a local cluster) until SIGTERM / SIGINT, then
    shut Serve down (replicas drain their requests) and leave Ray. Returns 0."""
    ray = require("ray", "Ray Serve replicas (--ray)", extra="serve-ray")
    if address == "local":
        ray.init(num_cpus=ray_cpus, object_store_memory=object_store_mb * 2**20 if object_store_mb else None,
                 include_dashboard=False)
    else:
        ray.init(address=address)
    try:
        # after ray.init, whose own SIGTERM handler exits at once: from here a signal means "drain"
        with stop_signals() as stop:
            serve.start(http_options={"host": host, "port": port})
            serve.run(deployment(config, replicas=replicas, cpus=replica_cpus, gpus=replica_gpus), name="pickscore",
                      route_prefix="/")
            progress(f"ready: {replicas} replica(s) of {config.artifacts} on Ray, serving {base_url(host, port)}")
            while not stop.wait(0.5):
                pass
            progress("stopping: draining the replicas")
            serve.shutdown()
    finally:
        ray.shutdown()
    progress("stopped")
    return 0


@contextlib.contextmanager
def stop_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT / SIGTERM while the block runs."""
    stop = threading.Event()
    saved = {s: signal.signal(s, lambda signum, frame: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
