"""`pickscore serve`: the app under uvicorn in this process, or as Ray Serve replicas (`--ray`).

SIGTERM / SIGINT drain: uvicorn stops accepting connections, every request already accepted is
answered, the batcher finishes, and the command exits 0 (a service stopped as asked). A load failure
(missing artifacts, a backend that cannot run here) exits 2 with one line, as every command does.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator

from ..artifacts import Artifacts
from ..backends import select_backend
from ..console import EXIT_OK, say
from ..errors import PickScoreError
from ..optional import require
from ..options import ScorerOptions
from ..results import RANDOM_WEIGHTS_BANNER
from .auth import load_key_digests
from .config import ServerConfig, base_url

SERVER_MODULES = ("fastapi", "uvicorn", "prometheus_client")


def config_from_args(args: Any) -> ServerConfig:
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key_file:
        say(f"warning: serving on {args.host} without --api-key-file: anyone who can reach it can use it")
    return ServerConfig(
        artifacts=str(args.artifacts), scorer=ScorerOptions.from_args(args), max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, max_body_mb=args.max_body_mb, request_timeout_s=args.request_timeout_s,
        body_timeout_s=args.body_timeout_s, max_images=args.max_images, reward_divide_by=args.reward_divide_by,
        result_ttl_s=args.result_ttl_s,
        api_key_digests=load_key_digests(args.api_key_file) if args.api_key_file else ())


def cmd_serve(args: Any) -> int:
    for module in SERVER_MODULES:
        require(module, "pickscore serve", extra="server")
    # What can be checked in a moment is checked before anything listens: the artifacts (sizes; hashes
    # are checked by the load proper) and whether the backend can run here.
    config = config_from_args(args)
    select_backend(Artifacts.load(args.artifacts, hash_check="size"), config.scorer.backend, config.scorer.precision)
    if args.ray:
        from .ray_serve import serve_on_ray

        return serve_on_ray(config, args.ray, host=args.host, port=args.port, replicas=args.replicas,
                            replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
                            ray_cpus=args.ray_cpus, object_store_mb=args.ray_object_store_mb, progress=say)
    return serve_here(config, args.host, args.port)


def serve_here(config: ServerConfig, host: str, port: int) -> int:
    """Serve with uvicorn until SIGTERM / SIGINT; 0 after a clean drain, PickScoreError if loading failed."""
    uvicorn = require("uvicorn", "pickscore serve", extra="server")
    from .app import build_app
    from .service import PickScoreService

    class DrainingServer(uvicorn.Server):
        """uvicorn's graceful shutdown, with readiness turning 503 as soon as the signal arrives."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            service.begin_drain()
            super().handle_exit(sig, frame)

    def ready(loaded: PickScoreService) -> None:
        d = loaded.describe()
        if d["random_weights"]:
            say(f"WARNING: {RANDOM_WEIGHTS_BANNER}")
        say(f"ready: {config.artifacts} on {d['backend']}/{d['precision']} (max batch {d['max_batch']}), "
            f"serving {base_url(host, port)}")

    def failed(error: BaseException) -> None:
        server.should_exit = True

    service = PickScoreService(config, on_ready=ready, on_failure=failed)
    server = DrainingServer(uvicorn.Config(
        build_app(service), host=host, port=port, log_level="warning", access_log=False, lifespan="on",
        # a drain waits for the requests in flight, each bounded by the body and request timeouts
        timeout_graceful_shutdown=int(config.drain_timeout_s)))
    with signals_end_cleanly():
        server.run()
    if service.error is not None:
        if isinstance(service.error, PickScoreError):
            raise service.error
        raise PickScoreError(f"could not start: {type(service.error).__name__}: {service.error}")
    if service.cut_short:
        say(f"stopped: {service.cut_short} accepted request(s) were still running at the drain deadline "
            f"({config.drain_timeout_s:g} s) and were answered 503; every other one was answered")
    else:
        say("stopped: every accepted request was answered")
    return EXIT_OK


@contextlib.contextmanager
def signals_end_cleanly() -> Iterator[None]:
    """uvicorn re-raises the signal that stopped it once it has shut down, so that the default action
    (death by signal) follows. A drained server has done what SIGTERM asks: it exits 0 instead."""
    saved = {s: signal.signal(s, lambda signum, frame: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
