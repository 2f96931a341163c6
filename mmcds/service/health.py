"""Operating the service: health and readiness probes, ``/metrics``, request ids, hook timing.

``install_operations(app, services)`` is all ``create_app`` calls (``probe_app`` serves the
probes and metrics alone, for queue workers and the Ray models head). It adds

- ``GET /healthz``: the process answers (liveness: restart it when this fails);
- ``GET /readyz``: it can do its job now (readiness: send it traffic only when this is 200):
  the database answers, the models are loaded (the first probe starts loading them, so a
  replica never takes a hook before its models are in memory), the default FHIR server
  answers, the work queue answers (where there is one), and every check another part
  registered with ``add_readiness_check`` passes. A failing check answers 503 naming the
  check and why, never a credential;
- ``GET /metrics``: the process's default Prometheus registry (``mmcds.metrics``);
- gauges read from the database at scrape time: the outbox's states and the queue's depth;
- a middleware that gives every request an id (the caller's ``X-Request-ID`` when it is a
  plain bounded token, else a fresh UUID), puts it on every log line of that request
  (``mmcds.service.logs``) and on the response, and times hooks per CDS service.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection

import httpx
import uvicorn
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, generate_latest
from sqlalchemy import func, select, text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmcds.metrics import (
    HOOK_RESPONSES,
    HOOK_SECONDS,
    HOOKS_IN_FLIGHT,
    set_outbox_source,
    set_queue_source,
)
from mmcds.service.analysis import AnalysisService
from mmcds.service.logs import new_request_id, request_id_var
from mmcds.service.outbox import Outbox
from mmcds.settings import Settings

log = logging.getLogger(__name__)

#: A readiness check: None when fine, else the reason in a few words (no secrets, no PHI).
Check = Callable[[], str | None]
HOOK_PREFIX = "/cds-services/"

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    checks: dict[str, Check] = request.app.state.readiness_checks
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            reason = check()
        except Exception as exc:  # a check that crashes is a failed check, not a 500
            reason = f"check failed: {type(exc).__name__}"
        results[name] = "ok" if reason is None else reason
    ready = all(v == "ok" for v in results.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": results},
        status_code=200 if ready else 503,
    )


@router.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def add_readiness_check(app: FastAPI, name: str, check: Check) -> None:
    """Make ``/readyz`` depend on ``check`` too (e.g. the background queue)."""
    app.state.readiness_checks[name] = check


def outbox_counts(outbox: Outbox) -> dict[str, int]:
    t = outbox.table
    with outbox.engine.connect() as conn:
        rows = conn.execute(select(t.c.status, func.count()).group_by(t.c.status)).all()
    return {str(status): int(n) for status, n in rows}


# --- readiness checks -------------------------------------------------------------------------


def _database(service: AnalysisService) -> Check:
    def check() -> str | None:
        with service.outbox.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None

    return check


class _ModelWarmUp:
    """Loads the models in the background on the first probe; reports loading or failure."""

    def __init__(self, service: AnalysisService) -> None:
        self.service = service
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        try:
            self.service.pipeline  # noqa: B018 - the property loads the models
        except Exception as exc:
            self.error = f"models failed to load: {type(exc).__name__}: {str(exc)[:200]}"
            log.exception("loading the models failed")

    def __call__(self) -> str | None:
        if self.service.models_loaded:
            return None
        if self.error:
            return self.error
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._load, name="mmcds-warmup", daemon=True)
                self._thread.start()
        return "loading models"


def _fhir_server(url: str, timeout_s: float) -> Check:
    def check() -> str | None:
        try:
            response = httpx.get(f"{url.rstrip('/')}/metadata", timeout=timeout_s)
        except httpx.HTTPError as exc:
            return f"FHIR server unreachable ({type(exc).__name__})"
        if response.status_code >= 500:
            return f"FHIR server answered {response.status_code}"
        return None

    return check


# --- request ids and hook timing --------------------------------------------------------------


class OperationsMiddleware:
    """Pure ASGI (not ``BaseHTTPMiddleware``): it neither buffers bodies nor breaks streaming."""

    def __init__(self, app: ASGIApp, services: Collection[str]) -> None:
        self.app = app
        self.services = frozenset(services)
        # Each labelled child looked up once: ``labels()`` takes a lock and builds a key on
        # every call. Both label sets are bounded (known service ids, HTTP status codes).
        self._seconds = {s: HOOK_SECONDS.labels(s) for s in (*self.services, "unknown")}
        self._responses: dict[tuple[str, int], Counter] = {}

    def _count(self, label: str, status: int) -> None:
        child = self._responses.get((label, status))
        if child is None:
            child = self._responses[(label, status)] = HOOK_RESPONSES.labels(label, str(status))
        child.inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = dict(scope.get("headers") or []).get(b"x-request-id", b"")
        request_id = new_request_id(offered.decode("latin-1"))
        token = request_id_var.set(request_id)
        path: str = scope.get("path", "")
        hook = scope.get("method") == "POST" and path.startswith(HOOK_PREFIX)
        status = 500  # what the client sees if the app dies before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        started = time.perf_counter()
        if hook:
            HOOKS_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if hook:
                HOOKS_IN_FLIGHT.dec()
                # Only known ids become labels: a caller must not grow the label set at will.
                sid = path[len(HOOK_PREFIX) :].strip("/")
                label = sid if sid in self.services else "unknown"
                self._seconds[label].observe(time.perf_counter() - started)
                self._count(label, status)
            request_id_var.reset(token)


def readiness_checks(service: AnalysisService, settings: Settings) -> dict[str, Check]:
    """What ``/readyz`` checks, for the service and for queue workers alike: the database, the
    models (loaded in the background from the first probe on), the default FHIR server, and the
    work queue where there is one."""
    checks: dict[str, Check] = {
        "database": _database(service),
        "models": _ModelWarmUp(service),
        "fhir": _fhir_server(settings.fhir_base_url, timeout_s=2.0),
    }
    if service.queue is not None:
        checks["queue"] = service.queue.check
    return checks


def _read_at_scrape(service: AnalysisService) -> None:
    """The gauges read from the database at scrape time read this service's tables."""
    set_outbox_source(lambda: outbox_counts(service.outbox))
    set_queue_source(service.queue.depth if service.queue is not None else None)


def install_operations(app: FastAPI, services: Collection[str]) -> None:
    service: AnalysisService = app.state.analysis
    app.state.readiness_checks = readiness_checks(service, app.state.settings)
    _read_at_scrape(service)
    app.add_middleware(OperationsMiddleware, services=list(services))
    app.include_router(router)


def probe_app(checks: dict[str, Check], title: str) -> FastAPI:
    """``/healthz``, ``/readyz`` (on ``checks``) and ``/metrics`` alone, for a process that
    serves no hooks (a queue worker, the Ray models head)."""
    app = FastAPI(title=title, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.readiness_checks = checks
    app.include_router(router)
    return app


def worker_probe_app(service: AnalysisService, settings: Settings) -> FastAPI:
    """A queue worker's probes: the service's checks and metrics."""
    _read_at_scrape(service)
    return probe_app(readiness_checks(service, settings), "mmcds worker probes")


def start_probes(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    """Serve ``app`` from a side thread (so it installs no signal handlers: the main thread's
    own loop keeps them); set ``should_exit`` on the result to stop it."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # through the JSON handler like everything else
        access_log=False,  # probes every few seconds are noise
    )
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, name="mmcds-probes", daemon=True).start()
    return server
