"""The FastAPI application factory every service uses.

It wires the conventions shared by all services: JSON logs, ``/health``, ``/ready``,
``/metrics``, ``POST /v1/admin/reload`` (API key), JSON errors, request metrics, and a
:class:`ServiceRuntime` holding settings, the loaded model and the Kafka reachability check.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backbone.kafka import kafka_reachable
from backbone.service import metrics as m
from backbone.service.config import ServiceSettings
from backbone.service.errors import ErrorResponse, ServiceError, install_error_handlers
from backbone.service.logging import configure_logging
from backbone.service.security import api_key_header, check_api_key

log = logging.getLogger(__name__)


class ModelInfo(BaseModel):
    """What a loaded model is: name, version and where it came from."""

    name: str
    version: str
    path: str | None = None
    metrics: dict[str, Any] = {}
    created_at: str | None = None


class LoadedModel(Protocol):
    """Anything a service loads as its model: it only has to describe itself."""

    info: ModelInfo


ModelT = TypeVar("ModelT", bound=LoadedModel)


class HealthResponse(BaseModel):
    status: str
    service: str


class ReadyResponse(BaseModel):
    ready: bool
    service: str
    model: ModelInfo | None = None
    checks: dict[str, str]


class ReloadResponse(BaseModel):
    reloaded: bool
    previous: ModelInfo | None
    current: ModelInfo


@dataclass
class ServiceRuntime(Generic[ModelT]):
    """Per-app state: settings, the current model, and readiness checks."""

    settings: ServiceSettings
    load_model: Callable[[ServiceSettings], ModelT]
    needs_kafka: bool = False
    model: ModelT | None = None
    model_error: str | None = None
    extra_checks: dict[str, Callable[[], tuple[bool, str]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _kafka_checked_at: float = 0.0
    _kafka_state: tuple[bool, str] = (False, "not checked yet")

    def reload(self) -> ModelT:
        """Load the newest model and swap it in atomically; the old one keeps serving on failure."""
        service = self.settings.service_name
        try:
            model = self.load_model(self.settings)
        except Exception as exc:
            m.MODEL_RELOADS.labels(service, "failure").inc()
            with self._lock:
                if self.model is None:
                    self.model_error = f"{type(exc).__name__}: {exc}"
            raise
        with self._lock:
            old = self.model
            self.model = model
            self.model_error = None
        if old is not None:
            m.MODEL_INFO.remove(service, old.info.name, old.info.version)
        m.MODEL_INFO.labels(service, model.info.name, model.info.version).set(1)
        m.MODEL_LOADED.labels(service).set(1)
        m.MODEL_RELOADS.labels(service, "success").inc()
        log.info("model loaded", extra={"model": model.info.name, "version": model.info.version})
        return model

    def require_model(self) -> ModelT:
        """The current model, or a 503 explaining why there is none."""
        model = self.model
        if model is None:
            raise ServiceError(503, "model_not_loaded", self.model_error or "model is loading")
        return model

    def kafka_status(self, force: bool = False) -> tuple[bool, str]:
        """Cached Kafka reachability (re-checked at most every ``kafka_check_interval_s``)."""
        servers = self.settings.kafka_bootstrap_servers
        if not servers:
            state = (False, "KAFKA_BOOTSTRAP_SERVERS is not set")
        elif force or time.monotonic() - self._kafka_checked_at > self.settings.kafka_check_interval_s:
            state = kafka_reachable(servers, timeout_s=2.0)
            self._kafka_checked_at = time.monotonic()
        else:
            state = self._kafka_state
        self._kafka_state = state
        m.KAFKA_UP.labels(self.settings.service_name).set(1 if state[0] else 0)
        return state

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """(ready, reasons per check)."""
        checks: dict[str, str] = {}
        ok = True
        if self.model is None:
            ok = False
            checks["model"] = f"not loaded: {self.model_error or 'loading'}"
        else:
            checks["model"] = f"ok ({self.model.info.name} {self.model.info.version})"
        if self.needs_kafka and self.settings.kafka_required:
            up, reason = self.kafka_status()
            ok = ok and up
            checks["kafka"] = "ok" if up else f"unreachable: {reason}"
        for name, check in self.extra_checks.items():
            up, reason = check()
            ok = ok and up
            checks[name] = "ok" if up else reason
        return ok, checks


async def get_runtime(request: Request) -> ServiceRuntime[Any]:
    """FastAPI dependency: the app's runtime (async: a sync dependency costs a threadpool hop)."""
    return request.app.state.runtime


async def require_api_key(request: Request, key: str | None = Depends(api_key_header)) -> None:
    """FastAPI dependency guarding state-changing endpoints."""
    check_api_key(request, key)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 422, 429, 503)
}


class RequestMetricsMiddleware:
    """Pure ASGI middleware: request count and latency per route template, and an early 413 when the
    declared ``Content-Length`` exceeds the upload limit. (Starlette's ``@app.middleware("http")`` runs
    every request through extra tasks and streams; this costs a few microseconds.)"""

    def __init__(self, app: ASGIApp, service: str, max_body_bytes: int) -> None:
        self.app = app
        self.service = service
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            response = JSONResponse(
                status_code=413,
                content={
                    "error": "payload_too_large",
                    "detail": f"request body of {length.decode()} bytes exceeds {self.max_body_bytes}",
                },
            )
            await response(scope, receive, send)
            self._observe(scope, 413, 0.0)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self._observe(scope, status, time.perf_counter() - start)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope.get("method", "")
        m.HTTP_REQUESTS.labels(self.service, method, route, str(status)).inc()
        m.HTTP_LATENCY.labels(self.service, method, route).observe(seconds)


def create_service_app(
    settings: ServiceSettings,
    *,
    title: str,
    description: str,
    load_model: Callable[[ServiceSettings], Any],
    routers: Sequence[APIRouter] = (),
    needs_kafka: bool = False,
    on_startup: Sequence[Callable[[FastAPI], Awaitable[None]]] = (),
    on_shutdown: Sequence[Callable[[FastAPI], Awaitable[None]]] = (),
    version: str = "0.1.0",
) -> FastAPI:
    """Build a service app with the shared conventions; domain routes come in ``routers``.

    The model is loaded in the background at start so ``/health`` answers at once and
    ``/ready`` says 503 with the reason until the model is in.
    """
    configure_logging(settings.service_name, settings.log_level)
    runtime: ServiceRuntime[Any] = ServiceRuntime(
        settings=settings, load_model=load_model, needs_kafka=needs_kafka
    )
    m.MODEL_LOADED.labels(settings.service_name).set(0)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await asyncio.to_thread(runtime.reload)
        except Exception as exc:  # the service stays up and reports why it is not ready
            log.error("model load failed: %s", exc)
        for hook in on_startup:
            await hook(app)
        try:
            yield
        finally:
            for hook in on_shutdown:
                await hook(app)

    app = FastAPI(title=title, description=description, version=version, lifespan=lifespan)
    app.state.runtime = runtime
    install_error_handlers(app)
    service = settings.service_name

    app.add_middleware(
        RequestMetricsMiddleware, service=settings.service_name, max_body_bytes=settings.max_upload_bytes
    )

    @app.get("/health", response_model=HealthResponse, tags=["ops"])
    async def health() -> HealthResponse:
        """Liveness: the process answers."""
        return HealthResponse(status="alive", service=service)

    @app.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}}, tags=["ops"])
    async def ready() -> JSONResponse:
        """Readiness: 200 only when the model is loaded and Kafka is reachable where needed."""
        ok, checks = await asyncio.to_thread(runtime.readiness)
        model = runtime.model.info if runtime.model is not None else None
        body = ReadyResponse(ready=ok, service=service, model=model, checks=checks)
        return JSONResponse(status_code=200 if ok else 503, content=body.model_dump())

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format."""
        if runtime.needs_kafka:
            await asyncio.to_thread(runtime.kafka_status)
        payload, content_type = m.render_metrics()
        return Response(content=payload, media_type=content_type)

    @app.post(
        "/v1/admin/reload",
        response_model=ReloadResponse,
        responses=ERROR_RESPONSES,
        dependencies=[Depends(require_api_key)],
        tags=["admin"],
    )
    async def reload_model() -> ReloadResponse:
        """Load the newest model artifact (requires X-API-Key)."""
        previous = runtime.model.info if runtime.model is not None else None
        try:
            model = await asyncio.to_thread(runtime.reload)
        except FileNotFoundError as exc:
            raise ServiceError(404, "model_not_found", str(exc)) from exc
        except Exception as exc:
            raise ServiceError(503, "model_load_failed", f"{type(exc).__name__}: {exc}") from exc
        return ReloadResponse(
            reloaded=previous is None or previous.version != model.info.version,
            previous=previous,
            current=model.info,
        )

    for router in routers:
        app.include_router(router, responses=ERROR_RESPONSES)
    return app
