"""The CDS Hooks service over HTTP (FastAPI): discovery, hooks, feedback, model card, health.

This module only does HTTP. A hook call goes: size bound -> JWT verification -> body parsing
(``body``) and validation (``schema``) -> the hook's context rules (``hooks``) -> fhirServer
allowlist, then hands a ``Trigger`` (with the prefetch) to the ``AnalysisService``, which runs
the path (``mmcds.service.analysis``). Data that cannot be read gives a degraded card; required
data that can be neither prefetched nor fetched gives 412; a bad request gives a 4xx that says
what is wrong; nothing a client sends makes a 5xx.
"""

from __future__ import annotations

import gc
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from mmcds.errors import ConfigurationError
from mmcds.fusion.model import CARD_NAME, default_card
from mmcds.fusion.pipeline import Pipeline
from mmcds.service.admission import (
    AnalysisDep,
    Refused,
    ServiceIdParam,
    SettingsDep,
    admit,
    error,
    json_body,
    validated,
)
from mmcds.service.analysis import AnalysisResult, AnalysisService, Trigger
from mmcds.service.auth import JwtVerifier
from mmcds.service.cards import card_uuids, order_card, reason_suggestions, with_suggestions
from mmcds.service.conformance import problems_cards_response
from mmcds.service.feedback import FeedbackStore
from mmcds.service.feedback_api import router as feedback_router
from mmcds.service.health import install_operations
from mmcds.service.hooks import SERVICES, ContextRejected, HookService, check_context
from mmcds.service.hooks import imaging_orders as imaging_orders_of
from mmcds.service.logs import request_id_var
from mmcds.service.notify import router as notify_router
from mmcds.service.outbox import OutboxWorker
from mmcds.service.replay import replay_cache
from mmcds.service.review import router as review_router
from mmcds.service.review import with_review_links
from mmcds.service.schema import (
    CardsResponse,
    Discovery,
    ErrorBody,
    FeedbackRequest,
    HookRequest,
    OperationOutcome,
    operation_outcome,
)
from mmcds.settings import Settings, get_settings

log = logging.getLogger(__name__)


def allowed_fhir_server(hook_request: HookRequest, settings: Settings) -> str:
    fhir_server = (hook_request.fhirServer or settings.fhir_base_url).rstrip("/")
    if fhir_server not in {u.rstrip("/") for u in settings.fhir_allowlist}:
        raise Refused(
            error(403, "fhirServer is not on this service's allowlist (MMCDS_FHIR_ALLOWLIST)")
        )
    return fhir_server


def _trigger(hook_request: HookRequest, patient_id: str, fhir_server: str, rid: str) -> Trigger:
    auth = hook_request.fhirAuthorization
    encounter = hook_request.context.encounterId
    return Trigger(
        patient_id=patient_id,
        fhir_server=fhir_server,
        token=auth.access_token if auth else None,
        encounter=f"Encounter/{encounter}" if isinstance(encounter, str) and encounter else None,
        request_id=rid,
        prefetch=hook_request.prefetch,
    )


def hook_cards(
    service: HookService,
    result: AnalysisResult,
    orders: list[dict[str, Any]],
    alarms: list[str],
) -> list[dict[str, Any]]:
    """The analysis cards as this hook shows them (order hooks: beside the orders)."""
    if not service.orders_hook:
        return result.cards
    cards = [order_card(card, orders) for card in result.cards]
    if service.hook == "order-sign" and alarms and cards:
        cards[0] = with_suggestions(cards[0], reason_suggestions(alarms, orders))
    return cards


# --- the app ----------------------------------------------------------------------------------


def create_app(settings: Settings, pipeline: Pipeline | None = None) -> FastAPI:
    """The service. ``pipeline`` is built from settings on first use when not given."""
    if not settings.public_base_url.startswith(("https://", "http://")):  # links on every card
        raise ConfigurationError(
            f"MMCDS_PUBLIC_BASE_URL must be an absolute http(s) URL: {settings.public_base_url!r}"
        )
    service = AnalysisService(settings, pipeline=pipeline)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(settings.torch_threads)  # process-wide: this process serves
        worker = OutboxWorker(service.outbox, service.send, settings.outbox_interval_s)
        worker.start()
        if service.queue is not None:  # the queue the fast path defers misses to
            await service.queue.open_async()
        # What is alive now (torch, transformers and the rest: ~600k objects) lives as long as
        # the process; a full collection scanned it all, stopping every hook for 225 ms on a
        # quiet machine (the p99 of a one-process benchmark run) and ~1 s on a loaded one.
        # Frozen, collections scan only what hooks allocate.
        gc.freeze()
        try:
            yield
        finally:
            # Back to the collector before the interpreter tears down: frozen model objects
            # (torch, ONNX Runtime) made a worker that had frozen them crash at exit (SIGSEGV).
            gc.unfreeze()
            worker.stop()
            await service.fast.aclose()
            if service.queue is not None:
                await service.queue.close_async()

    app = FastAPI(title="mmcds", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.analysis = service
    # No hook waits for the replay cache longer than its budget: past it, refused (fail closed).
    app.state.verifier = JwtVerifier(
        settings.trusted_issuers,
        replay=replay_cache(settings),
        replay_timeout_s=settings.hook_budget_ms / 1000,
    )
    app.state.outbox = service.outbox
    app.state.feedback = FeedbackStore(settings.database_url)
    # Browser CDS clients: the preflight (OPTIONS) is answered here, before any JWT check; the
    # hook itself still needs its JWT. No cookies are used, so no credentials mode.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type"],
        max_age=600,
    )
    app.include_router(router)
    app.include_router(feedback_router)
    app.include_router(review_router)
    app.openapi = _openapi_with_bodies(app)  # type: ignore[method-assign]
    app.include_router(notify_router)  # FHIR Subscription rest-hook -> work queue
    install_operations(app, services=SERVICES)  # /healthz, /readyz, /metrics, request ids
    return app


def app_from_settings() -> FastAPI:
    """The app from the environment's settings: the factory ``mmcds serve`` gives uvicorn,
    which calls it once in each worker process."""
    return create_app(get_settings())


def _openapi_with_bodies(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's document plus the schemas of the bodies the POST routes read themselves (they
    parse the bytes after the JWT check, so FastAPI does not see a body parameter)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for model in (HookRequest, FeedbackRequest):
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            app.openapi_schema = document
        return app.openapi_schema

    return openapi


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the request cannot be used; the message says why"},
    401: {"description": "JWT missing or not acceptable (no detail given)"},
    403: {"model": ErrorBody, "description": "fhirServer not on the allowlist"},
    404: {"model": ErrorBody, "description": "unknown service"},
    413: {"model": ErrorBody, "description": "request body too large"},
}

router = APIRouter()


@router.get("/cds-services", response_model=Discovery, response_model_exclude_none=True)
def discovery() -> Discovery:
    return Discovery(services=[s.describe() for s in SERVICES.values()])


@router.get("/model-card", response_class=PlainTextResponse)
def model_card(settings: SettingsDep, service: AnalysisDep) -> str:
    card = Path(settings.fusion_model) / CARD_NAME if settings.fusion_model else None
    if card is not None and card.is_file():  # the card `mmcds train` wrote with its metrics
        return card.read_text(encoding="utf-8")
    return default_card(service.pipeline.fusion.config)


@router.post(
    "/cds-services/{service_id}",
    response_model=CardsResponse,
    response_model_exclude_none=True,
    responses={
        **ERRORS,
        412: {
            "model": OperationOutcome,
            "description": "required data neither prefetched nor readable from fhirServer",
        },
    },
    openapi_extra=json_body(HookRequest),
)
async def hook(service_id: ServiceIdParam, request: Request) -> Any:
    # The app's parts straight from its state rather than as four FastAPI dependencies:
    # solving those on every call cost more CPU than the hook's own stored-answer read.
    state = request.app.state
    settings: Settings = state.settings
    service: AnalysisService = state.analysis
    verifier: JwtVerifier = state.verifier
    feedback: FeedbackStore = state.feedback
    request_id = request_id_var.get() or str(uuid.uuid4())
    spec = SERVICES.get(service_id)
    if spec is None:
        return error(404, f"unknown CDS service {service_id!r}; see GET /cds-services")
    try:
        claims, data = await admit(request, settings, verifier, f"/cds-services/{service_id}")
        hook_request = validated(HookRequest, data)
        if hook_request.hook != spec.hook:
            raise Refused(
                error(400, f"service {service_id} answers {spec.hook}, not {hook_request.hook}")
            )
        context = hook_request.context.model_dump(exclude_none=True)
        patient_id = check_context(spec, context)
        fhir_server = allowed_fhir_server(hook_request, settings)
    except Refused as refused:
        return refused.response
    except ContextRejected as exc:
        return error(400, str(exc))
    log.info("hook %s jti=%s instance=%s", request_id, claims.get("jti"), hook_request.hookInstance)
    orders = imaging_orders_of(spec, context) if spec.orders_hook else []
    if spec.orders_hook and not orders:
        return {"cards": []}  # not an imaging order: nothing to say, nothing analysed
    trigger = _trigger(hook_request, patient_id, fhir_server, request_id)
    # The stored answer (fast path), or "in progress"; inline analysis only where configured.
    result = await service.answer(trigger)
    if result.fhir_unreachable:
        outcome = operation_outcome(
            "not-found",
            f"required data (the Patient) was not prefetched and could not be read from "
            f"fhirServer: {result.unavailable}",
        )
        return JSONResponse(outcome, status_code=412)
    alarms = await run_in_threadpool(service.alarms, result) if spec.hook == "order-sign" else []
    cards = hook_cards(spec, result, orders, alarms)
    if result.analysis_id is not None:  # feedback names only the card: remember its analysis
        cards = with_review_links(request, cards, service_id, result.analysis_id)
        uuids = [u for card in cards for u in card_uuids(card)]
        await feedback.link_cards_async(uuids, result.analysis_id, service_id=service_id)
    answer = {"cards": cards}
    # A stored answer's cards were checked when stored and when read back (``AnalysisStore``);
    # patient-view adds only the review link, on the public base URL checked at start-up.
    # Every other answer (order hooks' cards, in progress, unavailable) is checked here.
    if result.stored_analysis_id is None or spec.orders_hook:
        for problem in problems_cards_response(answer):  # our bug, not the EHR's: say so loudly
            log.error("hook %s: response breaks CDS Hooks 2.0: %s", request_id, problem)
    # Returned as is: the conformance check above is the response's validation, and FastAPI's
    # second pass through ``CardsResponse`` (which stays the OpenAPI document's answer) cost
    # more CPU than anything else a warm hook does after its JWT. orjson: the same JSON as
    # ``JSONResponse`` (UTF-8, no NaN), 40 us less per 3 KB answer.
    return Response(orjson.dumps(answer), media_type="application/json")
