"""The CDS Hooks service (FastAPI): discovery, hook endpoints, model card, health.

A hook call goes: size check -> JWT verification -> request validation -> fhirServer allowlist
-> gather -> pipeline -> cards, and the DiagnosticReport write-back. Data that cannot be read
gives a degraded card, never a crash; a bad request gives a 4xx that says what is wrong.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from mmcds.analysis_store import AnalysisStore
from mmcds.auth import AuthError, JwtVerifier
from mmcds.cards import analysis_card, unavailable_card
from mmcds.explain import explain
from mmcds.fhir.client import FhirClient, FhirError, FhirUnavailable
from mmcds.fhir.dicomweb import DicomWebClient
from mmcds.fhir.gather import Limits, gather_patient
from mmcds.fhir.report import report_bundle
from mmcds.fhir.writeback import send_bundle
from mmcds.fusion.model import CARD_NAME, default_card
from mmcds.outbox import Outbox, OutboxWorker
from mmcds.pipeline import Pipeline
from mmcds.records import content_hash
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


def create_app(settings: Settings, pipeline: Pipeline | None = None) -> FastAPI:
    """The service. ``pipeline`` is built from settings on first use when not given."""
    outbox = Outbox(settings.database_url)
    analyses = AnalysisStore(settings.database_url)

    def send(fhir_server: str, bundle: dict[str, Any]) -> str | None:
        return send_bundle(fhir_server, bundle, timeout_s=settings.fhir_timeout_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(settings.torch_threads)  # process-wide: this process serves
        worker = OutboxWorker(outbox, send, settings.outbox_interval_s)
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="mmcds", version="0.1.0", lifespan=lifespan)
    app.state.outbox = outbox
    verifier = JwtVerifier(settings.trusted_issuers)
    allowlist = {u.rstrip("/") for u in settings.fhir_allowlist}
    state: dict[str, Pipeline] = {}
    # Two cores: one analysis at a time keeps the answer time predictable instead of
    # letting concurrent hooks thrash each other's torch threads.
    analysis_lock = threading.Lock()
    limits = Limits(
        max_notes=settings.max_notes,
        max_note_chars=settings.max_note_chars,
        max_images=settings.max_images,
        max_image_pixels=settings.max_image_pixels,
        max_labs=settings.max_labs,
    )
    model_card_url = f"{settings.public_base_url.rstrip('/')}/model-card"

    pipeline_lock = threading.Lock()

    def get_pipeline() -> Pipeline:
        with pipeline_lock:  # loading models twice on concurrent first calls would waste seconds
            if "p" not in state:
                state["p"] = pipeline or Pipeline.from_settings(settings)
            return state["p"]

    @app.get("/cds-services")
    def discovery() -> dict[str, Any]:
        return {"services": [{"id": sid, **spec} for sid, spec in SERVICES.items()]}

    @app.get("/healthz")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model-card", response_class=PlainTextResponse)
    def model_card() -> str:
        card = Path(settings.fusion_model) / CARD_NAME if settings.fusion_model else None
        if card is not None and card.is_file():  # the card `mmcds train` wrote with its metrics
            return card.read_text(encoding="utf-8")
        return default_card(get_pipeline().fusion.config)

    @app.post("/cds-services/{service_id}")
    async def hook(service_id: str, request: Request) -> JSONResponse:
        request_id = str(uuid.uuid4())
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
            hook_request = HookRequest.model_validate(json.loads(body))
        except (ValueError, ValidationError) as exc:
            return _error(400, f"invalid CDS Hooks request: {str(exc)[:300]}")
        if hook_request.hook != SERVICES[service_id]["hook"]:
            return _error(
                400,
                f"service {service_id} answers {SERVICES[service_id]['hook']}, "
                f"not {hook_request.hook}",
            )
        patient_id = hook_request.context.get("patientId")
        if not isinstance(patient_id, str) or not patient_id:
            return _error(400, "context.patientId is required for patient-view")
        fhir_server = (hook_request.fhirServer or settings.fhir_base_url).rstrip("/")
        if fhir_server not in allowlist:
            return _error(
                403, "fhirServer is not on this service's allowlist (MMCDS_FHIR_ALLOWLIST)"
            )
        log.info(
            "hook %s jti=%s instance=%s", request_id, claims.get("jti"), hook_request.hookInstance
        )
        token = (
            hook_request.fhirAuthorization.access_token if hook_request.fhirAuthorization else None
        )
        encounter = hook_request.context.get("encounterId")
        # The analysis is CPU-bound: run it off the event loop.
        cards = await run_in_threadpool(
            _analyse,
            fhir_server,
            token,
            patient_id,
            f"Encounter/{encounter}" if isinstance(encounter, str) else None,
            request_id,
        )
        return JSONResponse({"cards": cards})

    def _analyse(
        fhir_server: str,
        token: str | None,
        patient_id: str,
        encounter: str | None,
        request_id: str,
    ) -> list[dict[str, Any]]:
        auth = (
            (settings.dicomweb_user, settings.dicomweb_password)
            if settings.dicomweb_user and settings.dicomweb_password
            else None
        )
        with (
            FhirClient(fhir_server, token=token, timeout=settings.fhir_timeout_s) as fhir,
            DicomWebClient(
                settings.dicomweb_url, auth=auth, max_bytes=settings.max_image_bytes
            ) as pacs,
        ):
            try:
                record = gather_patient(fhir, pacs, patient_id, limits=limits, encounter=encounter)
            except FhirUnavailable as exc:
                log.warning("hook %s: FHIR unavailable: %s", request_id, exc)
                return [unavailable_card("the FHIR server is unavailable", model_card_url)]
            except FhirError as exc:
                reason = "patient not found" if exc.status == 404 else f"FHIR error {exc.status}"
                return [unavailable_card(reason, model_card_url)]
            with analysis_lock:
                pipeline = get_pipeline()
                analysis = pipeline.analyse(record)
                stored = analyses.get(analysis.identifier)
                if stored is not None:  # computed once per analysis, then read back
                    explanation = stored.explanation
                else:
                    explanation = explain(pipeline, analysis)
                    analyses.put(analysis, explanation)
            card = analysis_card(analysis, explanation, model_card_url)
            # Stored before it is sent: a server that is down now gets it on a later retry.
            key = content_hash(f"{fhir_server}|{analysis.identifier}")
            outbox.enqueue(key, fhir_server, report_bundle(analysis, explanation))
            outbox.deliver(send, key=key)
            delivery = outbox.get(key)
            if delivery is not None and delivery.status == "delivered":
                log.info("hook %s wrote DiagnosticReport/%s", request_id, delivery.report_id)
                card["detail"] += f"\n\nWritten back as DiagnosticReport/{delivery.report_id}."
            else:
                card["detail"] += (
                    "\n\nThe report could not be written back to the EHR yet; "
                    "it is queued and will be retried."
                )
            return [card]

    return app
