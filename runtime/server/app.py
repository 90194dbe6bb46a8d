"""The ASGI application: the same app under uvicorn (`pickscore serve`) and as a Ray Serve replica.

Every scoring endpoint goes the same way: auth -> 503 at once if the queue is full -> the body, read up
to the size limit (413) within the body timeout (408) -> a place in the bounded queue (503 + Retry-After
when full) -> parsed in a worker thread (400 naming the problem, 413 over --max-images) -> the
micro-batcher (504 after the request timeout) -> rendered in a worker thread. A place in the queue is
taken only once the whole body is here, so clients that send slowly cannot hold the queue. JSON, pickle,
tokenising and image decoding never run on the event loop. Every refusal, the framework's own (unknown
route, wrong method) included, has the documented shape `{"error": {"message", "type", "code"}}`.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (fastapi.Request,
# imported lazily inside build_app) as objects.
import asyncio
import contextlib
import json
import logging
import time
from typing import Any
from uuid import uuid4

from .. import __version__
from ..optional import require
from . import cosmos
from .auth import authorized
from .http_errors import BadRequest, PayloadTooLarge, RequestRefused, RequestTimeout, ShuttingDown, Unauthorized, refusal_for
from .protocols import JSON as JSON_MEDIA
from .protocols import PROTOCOLS, Protocol
from .service import PickScoreService

log = logging.getLogger("pickscore")


async def read_body(request: Any, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 as soon as it is known to be over `limit` bytes, and with 408
    when it has not arrived in full within `timeout_s` (a stalled or dripping client)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest(f"bad Content-Length {declared!r}") from None
        if size > limit:
            raise PayloadTooLarge(f"request body of {size} bytes is over the {limit} byte limit (--max-body-mb)")

    async def receive() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the {limit} byte limit (--max-body-mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(receive(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"the request body did not arrive in full within {timeout_s:g} s (--body-timeout-s)") from None


def build_app(service: PickScoreService, *, load_on_startup: bool = False) -> Any:
    """The FastAPI app around `service`. Loading starts with the app's lifespan: in the background
    (/readyz tells when it is done), or, with load_on_startup, before the app takes requests (Ray Serve:
    a replica is routed to only once its startup has finished)."""
    fastapi = require("fastapi", "pickscore serve", extra="server")
    exceptions = require("starlette.exceptions", "pickscore serve", extra="server")
    validation = require("fastapi.exceptions", "pickscore serve", extra="server")
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
                service.check_open()
                body = await read_body(request, config.max_body_bytes, config.body_timeout_s)
                # arrived before a drain began: still answered, as a request in flight is
                with service.admitted(arrived_ready=True):
                    parsed = await in_thread(protocol.parse, body, config.max_images)
                    job = await service.embed(parsed.prompts, parsed.images, parsed.image_index)
                    content = await in_thread(protocol.render, parsed, job, service.context)
                response = Response(content, media_type=protocol.media_type)
            except RequestRefused as e:
                response = refused(e)
            except asyncio.CancelledError:
                # uvicorn cancels what is still running at the drain deadline: answer it in our shape, and count
                # it, so that the shutdown line does not claim every request was answered in full
                service.cut_short += 1
                response = refused(ShuttingDown("the server shut down before this request was answered "
                                                f"(drain deadline {config.drain_timeout_s:g} s); send it again"))
            except Exception as e:  # noqa: BLE001 - an accepted request is always answered
                log.exception("internal error in %s", protocol.path)
                response = refused(RequestRefused(f"internal error: {type(e).__name__}: {e}"))
            metrics.requests.labels(protocol.name, str(response.status_code)).inc()
            metrics.latency.labels(protocol.name).observe(time.perf_counter() - started)
            return response

        handle.__name__ = protocol.name
        return handle

    async def framework_refusal(request: Request, exc: Any) -> Response:
        """404, 405 and the like from routing, in our error shape."""
        path, method = request.url.path, request.method
        message = {404: f"no such endpoint: {method} {path} (the endpoints are in docs/server.md)",
                   405: f"{path} does not take {method} (use {(exc.headers or {}).get('Allow', 'another method')})"}
        return refused(refusal_for(exc.status_code, message.get(exc.status_code, f"{path}: {exc.detail}"), exc.headers))

    async def invalid(request: Request, exc: Any) -> Response:
        return refused(BadRequest(f"{request.url.path}: {exc.errors()}"))

    async def internal(request: Request, exc: Exception) -> Response:
        log.error("internal error in %s: %s: %s", request.url.path, type(exc).__name__, exc)
        return refused(RequestRefused(f"internal error: {type(exc).__name__}: {exc}"))

    app.add_exception_handler(exceptions.HTTPException, framework_refusal)
    app.add_exception_handler(validation.RequestValidationError, invalid)
    app.add_exception_handler(Exception, internal)

    for protocol in PROTOCOLS.values():
        for path in (protocol.path, *protocol.aliases):
            app.add_api_route(path, endpoint(protocol), methods=["POST"], name=f"{protocol.name} {path}",
                              summary=f"{protocol.name} ({protocol.media_type})")

    # ---- cosmos-rl: enqueue now, pull the result later -------------------------------------------------
    results = cosmos.ResultStore(config.result_ttl_s)
    background: set[asyncio.Task] = set()  # held, so that a running task is never garbage-collected

    async def score_later(uuid: str, parsed: Any, place: contextlib.ExitStack) -> None:
        with place:  # the request keeps its place in the queue until it is scored
            try:
                job = await service.embed(parsed.prompts, parsed.images, parsed.image_index)
                results.finish(uuid, 200, await in_thread(cosmos.render_result, parsed, job, service.context))
            except RequestRefused as e:
                results.finish(uuid, e.status, json.dumps(e.body()).encode())
            except Exception as e:  # noqa: BLE001 - reported to whoever pulls it
                log.exception("internal error scoring %s", uuid)
                failure = RequestRefused(f"internal error: {type(e).__name__}: {e}")
                results.finish(uuid, failure.status, json.dumps(failure.body()).encode())

    @app.post(cosmos.ENQUEUE_PATH)
    async def cosmos_enqueue(request: Request):
        started, place = time.perf_counter(), contextlib.ExitStack()
        try:
            check_auth(request)
            service.check_open()
            body = await read_body(request, config.max_body_bytes, config.body_timeout_s)
            place.enter_context(service.admitted(arrived_ready=True))
            parsed = await in_thread(cosmos.parse_enqueue, body, config.max_images)
            uuid = str(uuid4())
            results.add_pending(uuid)
            task = asyncio.create_task(score_later(uuid, parsed, place.pop_all()))
            background.add(task)
            task.add_done_callback(background.discard)
            response = JSONResponse({"uuid": uuid})
        except RequestRefused as e:
            response = refused(e)
        finally:
            place.close()  # released here unless the task took it
        metrics.requests.labels("cosmos_enqueue", str(response.status_code)).inc()
        metrics.latency.labels("cosmos_enqueue").observe(time.perf_counter() - started)
        return response

    @app.post(cosmos.PULL_PATH)
    async def cosmos_pull(request: Request):
        try:
            check_auth(request)
            body = await read_body(request, 64 * 1024, config.body_timeout_s)
            uuid, _ = cosmos.pull_fields(body, request.headers.get("content-type", ""))
            status, content = results.get(uuid)
            response = Response(content, status_code=status, media_type=JSON_MEDIA)
        except RequestRefused as e:
            response = refused(e)
        metrics.requests.labels("cosmos_pull", str(response.status_code)).inc()
        return response

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
