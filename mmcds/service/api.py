"""The CDS Hooks service over HTTP (FastAPI): discovery, hook endpoints, model card.

This module only does HTTP: a hook call goes size check -> JWT verification -> request
validation -> fhirServer allowlist, then hands a ``Trigger`` to the ``AnalysisService``, which
runs the path (``mmcds.service.analysis``). Data that cannot be read gives a degraded card,
never a crash; a bad request gives a 4xx that says what is wrong.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from mmcds.fusion.model import CARD_NAME, default_card
from mmcds.fusion.pipeline import Pipeline
from mmcds.service.analysis import AnalysisService, Trigger
from mmcds.service.auth import AuthError, JwtVerifier
from mmcds.service.health import install_operations, observe_assessment
from mmcds.service.logs import request_id_var
from mmcds.service.outbox import OutboxWorker
from mmcds.settings import Settings

log = logging.getLogger(__name__)

SERVICES: dict[str, dict[str, str]] = {
    "mmcds-patient-view": {
        "hook": "patient-view",
        "title": "Multimodal AI risk summary",
        "description": "Fuses chest imaging, clinical notes and labs into a preliminary, "
        "calibrated risk summary for pneumonia, heart failure, pleural effusion and "
        "pneumothorax, with the evidence behind it.",
    },
}


class FhirAuthorization(BaseModel):
    access_token: str
    token_type: Literal["Bearer", "bearer"] = "Bearer"
    expires_in: int | None = None
    scope: str | None = None
    subject: str | None = None


class HookRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    hook: str
    hookInstance: str
    fhirServer: str | None = None
    fhirAuthorization: FhirAuthorization | None = None
    context: dict[str, Any] = Field(default_factory=dict)
    prefetch: dict[str, Any] | None = None


async def _read_bounded(request: Request, limit: int) -> bytes | None:
    """The body, or None once it exceeds ``limit`` bytes: stop reading rather than buffer an
    attacker's gigabytes before saying no."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Source(BaseModel):
    label: str
    url: str | None = None


class Coding(BaseModel):
    code: str
    system: str | None = None
    display: str | None = None


class Link(BaseModel):
    label: str
    url: str
    type: Literal["absolute", "smart"]


class Card(BaseModel):
    """A CDS Hooks 2.0 card; optional members are omitted, never sent as null."""

    uuid: str
    summary: str = Field(max_length=139)
    indicator: Literal["info", "warning", "critical"]
    detail: str | None = None
    source: Source
    links: list[Link] | None = None
    overrideReasons: list[Coding] | None = None


class CardsResponse(BaseModel):
    cards: list[Card]


class ServiceDescription(BaseModel):
    id: str
    hook: str
    title: str
    description: str
    prefetch: dict[str, str] | None = None


class Discovery(BaseModel):
    services: list[ServiceDescription]


# --- dependencies: what each endpoint needs, built once per app in create_app ---------------


def app_settings(request: Request) -> Settings:
    return request.app.state.settings


def analysis_service(request: Request) -> AnalysisService:
    return request.app.state.analysis


def jwt_verifier(request: Request) -> JwtVerifier:
    return request.app.state.verifier


SettingsDep = Annotated[Settings, Depends(app_settings)]
AnalysisDep = Annotated[AnalysisService, Depends(analysis_service)]
VerifierDep = Annotated[JwtVerifier, Depends(jwt_verifier)]


# --- the hook, step by step -------------------------------------------------------------------


class HookRefused(Exception):
    """A hook call answered with an HTTP error before any analysis."""

    def __init__(self, response: JSONResponse) -> None:
        self.response = response


def _parse_hook(service_id: str, body: bytes, settings: Settings) -> tuple[HookRequest, str]:
    """The validated request and the FHIR server it may name; ``HookRefused`` otherwise."""
    try:
        hook_request = HookRequest.model_validate(json.loads(body))
    except (ValueError, ValidationError) as exc:
        raise HookRefused(_error(400, f"invalid CDS Hooks request: {str(exc)[:300]}")) from exc
    expected = SERVICES[service_id]["hook"]
    if hook_request.hook != expected:
        raise HookRefused(
            _error(400, f"service {service_id} answers {expected}, not {hook_request.hook}")
        )
    patient_id = hook_request.context.get("patientId")
    if not isinstance(patient_id, str) or not patient_id:
        raise HookRefused(_error(400, "context.patientId is required for patient-view"))
    fhir_server = (hook_request.fhirServer or settings.fhir_base_url).rstrip("/")
    if fhir_server not in {u.rstrip("/") for u in settings.fhir_allowlist}:
        raise HookRefused(
            _error(403, "fhirServer is not on this service's allowlist (MMCDS_FHIR_ALLOWLIST)")
        )
    return hook_request, fhir_server


def _trigger(hook_request: HookRequest, fhir_server: str, request_id: str) -> Trigger:
    auth = hook_request.fhirAuthorization
    encounter = hook_request.context.get("encounterId")
    return Trigger(
        patient_id=str(hook_request.context["patientId"]),
        fhir_server=fhir_server,
        token=auth.access_token if auth else None,
        encounter=f"Encounter/{encounter}" if isinstance(encounter, str) else None,
        request_id=request_id,
    )


# --- the app ----------------------------------------------------------------------------------


def create_app(settings: Settings, pipeline: Pipeline | None = None) -> FastAPI:
    """The service. ``pipeline`` is built from settings on first use when not given."""
    service = AnalysisService(settings, pipeline=pipeline)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(settings.torch_threads)  # process-wide: this process serves
        worker = OutboxWorker(service.outbox, service.send, settings.outbox_interval_s)
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="mmcds", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.analysis = service
    app.state.verifier = JwtVerifier(settings.trusted_issuers)
    app.state.outbox = service.outbox
    app.include_router(router)
    install_operations(app, services=SERVICES)  # /healthz, /readyz, /metrics, request ids
    return app


router = APIRouter()


@router.get("/cds-services", response_model=Discovery, response_model_exclude_none=True)
def discovery() -> Discovery:
    return Discovery(
        services=[
            ServiceDescription.model_validate({"id": sid, **spec}) for sid, spec in SERVICES.items()
        ]
    )


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
    responses={400: {}, 401: {}, 403: {}, 404: {}, 413: {}},
)
async def hook(
    service_id: str,
    request: Request,
    settings: SettingsDep,
    service: AnalysisDep,
    verifier: VerifierDep,
) -> Any:
    request_id = request_id_var.get() or str(uuid.uuid4())
    if service_id not in SERVICES:
        return _error(404, f"unknown CDS service {service_id!r}; see GET /cds-services")
    body = await _read_bounded(request, settings.max_request_bytes)
    if body is None:
        return _error(413, f"request body over {settings.max_request_bytes} bytes")
    endpoint = f"{settings.public_base_url.rstrip('/')}/cds-services/{service_id}"
    try:
        claims = verifier.verify(request.headers.get("authorization"), endpoint)
    except AuthError as exc:
        log.warning("hook %s rejected: %s", request_id, exc)
        return JSONResponse({}, status_code=401)
    try:
        hook_request, fhir_server = _parse_hook(service_id, body, settings)
    except HookRefused as refused:
        return refused.response
    log.info("hook %s jti=%s instance=%s", request_id, claims.get("jti"), hook_request.hookInstance)
    # The analysis is CPU-bound: run it off the event loop.
    result = await run_in_threadpool(
        service.analyse, _trigger(hook_request, fhir_server, request_id)
    )
    if result.analysis is not None:
        observe_assessment(result.analysis.assessment)
    return {"cards": result.cards}
