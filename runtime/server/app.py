"""The ASGI application: the same app under uvicorn (`pickscore serve`) and as a Ray Serve replica.

Every scoring endpoint goes the same way: auth -> a place in the bounded queue (503 + Retry-After when
full) -> the body, read up to the size limit (413) -> parsed in a worker thread (400 naming the
problem) -> the micro-batcher (504 after the request timeout) -> rendered in a worker thread. JSON,
pickle and image decoding never run on the event loop.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (fastapi.Request,
# imported lazily inside build_app) as objects.
import contextlib
import logging
import time
from typing import Any

from .. import __version__
from ..optional import require
from .auth import authorized
from .http_errors import BadRequest, PayloadTooLarge, RequestRefused, Unauthorized
from .protocols import PROTOCOLS, Protocol
from .service import PickScoreService

log = logging.getLogger("pickscore")


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to be over `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest(f"bad Content-Length {declared!r}") from None
        if size > limit:
            raise PayloadTooLarge(f"request body of {size} bytes is over the {limit} byte limit (--max-body-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the {limit} byte limit (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(service: PickScoreService, *, load_on_startup: bool = False) -> Any:
    """The FastAPI app around `service`. Loading starts with the app's lifespan: in the background
    (/readyz tells when it is done), or, with load_on_startup, before the app takes requests (Ray Serve:
    a replica is routed to only once its startup has finished)."""
    fastapi = require("fastapi", "pickscore serve", extra="server")
    responses = require("fastapi.responses", "pickscore serve", extra="server")
    concurrency = require("starlette.concurrency", "pickscore serve", extra="server")
    Request, Response, JSONResponse = fastapi.Request, responses.Response, responses.JSONResponse
    in_thread = concurrency.run_in_threadpool
    config, metrics = service.config, service.metrics

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        if load_on_startup:
            await in_thread(service.load)
        else:
            service.start_loading()
        try:
            yield
        finally:
            await in_thread(service.close)

    # No /docs or /openapi.json: they would answer without a key, and the handlers read raw bodies anyway.
    app = fastapi.FastAPI(title="PickScore server", version=__version__, lifespan=lifespan,
                          description="PickScore v1 image/prompt preference scores, batched across requests.",
                          docs_url=None, redoc_url=None, openapi_url=None)

    def refused(e: RequestRefused) -> Any:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def check_auth(request: Any) -> None:
        if not authorized(request.headers.get("authorization"), config.api_key_digests):
            raise Unauthorized()

    def endpoint(protocol: Protocol):
        async def handle(request: Request) -> Response:
            started = time.perf_counter()
            try:
                check_auth(request)
                with service.admitted():
                    body = await read_body(request, config.max_body_bytes)
                    parsed = await in_thread(protocol.parse, body)
                    job = await service.embed(parsed.prompts, parsed.images, parsed.image_index)
                    content = await in_thread(protocol.render, parsed, job, service.context)
                response = Response(content, media_type=protocol.media_type)
            except RequestRefused as e:
                response = refused(e)
            except Exception as e:  # noqa: BLE001 - an accepted request is always answered
                log.exception("internal error in %s", protocol.path)
                response = refused(RequestRefused(f"internal error: {type(e).__name__}: {e}"))
            metrics.requests.labels(protocol.name, str(response.status_code)).inc()
            metrics.latency.labels(protocol.name).observe(time.perf_counter() - started)
            return response

        handle.__name__ = protocol.name
        return handle

    for protocol in PROTOCOLS.values():
        app.add_api_route(protocol.path, endpoint(protocol), methods=["POST"], name=protocol.name,
                          summary=f"{protocol.name} ({protocol.media_type})")

    @app.get("/healthz")
    async def healthz():
        """Liveness: the process answers (also while loading or draining)."""
        return {"status": "ok" if service.state != "failed" else "failed"}

    @app.get("/readyz")
    async def readyz():
        """Readiness: artifacts loaded and warmed up, and not draining."""
        return JSONResponse(service.describe(), status_code=200 if service.ready else 503)

    def unauthorized(request: Request) -> Response | None:
        """The 401 for a GET that needs the key, or None."""
        try:
            check_auth(request)
        except RequestRefused as e:
            return refused(e)
        return None

    @app.get("/metrics")
    async def prometheus(request: Request):
        if (refusal := unauthorized(request)) is not None:
            return refusal
        content, media_type = await in_thread(metrics.render)
        return Response(content, media_type=media_type)

    @app.get("/v1/models")
    async def models(request: Request):
        if (refusal := unauthorized(request)) is not None:
            return refusal
        name = service.context.model if service.context else "pickscore"
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "pickscore"}]}

    return app
