"""FHIR R4 Subscription (rest-hook) notifications: new data in, analysis queued.

A FHIR server with an active Subscription (criteria e.g. ``ImagingStudy?``,
``DocumentReference?``, ``Observation?category=laboratory``; channel ``rest-hook`` with endpoint
``{public base}/fhir-notify`` and header ``Authorization: Bearer <MMCDS_NOTIFY_SECRET>``) tells
the service when a patient's inputs change. R4 sends either an empty ``POST`` (no payload) or,
with ``channel.payload``, the resource by ``PUT {endpoint}/{type}/{id}``; a ``POST`` of the
resource or a Bundle of them is accepted too. The patient each resource is about is queued for
analysis (``WorkQueue``: one waiting job per patient however many notifications arrive), and the
notification is answered at once; the work happens in ``mmcds worker``.

A notification names no FHIR server: it is the service's ``fhir_base_url``, or the allow-listed
``?fhirServer=`` of the Subscription's endpoint.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from mmcds.service.analysis import AnalysisService
from mmcds.settings import Settings

log = logging.getLogger(__name__)

MAX_PATIENTS_PER_NOTIFICATION = 100
MAX_NOTIFICATION_BYTES = 5_000_000
WATCHED = {"ImagingStudy", "DocumentReference", "Observation", "Patient", "Media"}


class NotificationError(ValueError):
    """A notification body the service cannot use."""


def patients_in(body: Any) -> set[str]:
    """Patient ids the resource (or each resource of a Bundle) is about."""
    resources: list[Any]
    if isinstance(body, dict) and body.get("resourceType") == "Bundle":
        resources = [e.get("resource") for e in body.get("entry") or [] if isinstance(e, dict)]
    else:
        resources = [body]
    patients: set[str] = set()
    for resource in resources:
        if not isinstance(resource, dict) or resource.get("resourceType") not in WATCHED:
            continue
        if resource["resourceType"] == "Patient" and isinstance(resource.get("id"), str):
            patients.add(resource["id"])
            continue
        for key in ("subject", "patient"):
            ref = (resource.get(key) or {}).get("reference")
            if isinstance(ref, str) and ref.startswith("Patient/") and len(ref) > len("Patient/"):
                patients.add(ref.removeprefix("Patient/").split("/")[0])
    if len(patients) > MAX_PATIENTS_PER_NOTIFICATION:
        raise NotificationError(f"over {MAX_PATIENTS_PER_NOTIFICATION} patients in a notification")
    return patients


def authorised(header: str | None, secret: str | None) -> bool:
    """The Subscription's header carries the shared secret (compared in constant time)."""
    if not secret or not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header.removeprefix("Bearer ").encode(), secret.encode())


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _service(request: Request) -> AnalysisService:
    return request.app.state.analysis


router = APIRouter()


@router.post("/fhir-notify", responses={400: {}, 401: {}, 403: {}, 413: {}, 503: {}})
@router.put("/fhir-notify/{resource_type}/{resource_id}", responses={400: {}, 401: {}, 503: {}})
async def fhir_notify(
    request: Request,
    settings: Annotated[Settings, Depends(_settings)],
    service: Annotated[AnalysisService, Depends(_service)],
    fhir_server: Annotated[str | None, Query(alias="fhirServer")] = None,
) -> JSONResponse:
    if not authorised(request.headers.get("authorization"), settings.notify_secret):
        return JSONResponse({}, status_code=401)
    server = (fhir_server or settings.fhir_base_url).rstrip("/")
    if server not in {u.rstrip("/") for u in settings.fhir_allowlist}:
        return JSONResponse({"error": "fhirServer is not on the allowlist"}, status_code=403)
    body = await request.body()
    if len(body) > MAX_NOTIFICATION_BYTES:
        return JSONResponse({"error": "notification too large"}, status_code=413)
    if not body.strip():  # an R4 ping without payload: nothing says which patient
        log.info("FHIR notification without payload: nothing queued")
        return JSONResponse({"queued": 0})
    try:
        patients = patients_in(json.loads(body))
    except (ValueError, RecursionError) as exc:
        return JSONResponse({"error": f"unusable notification: {str(exc)[:200]}"}, status_code=400)
    if service.queue is None:
        return JSONResponse({"error": "no work queue is configured"}, status_code=503)
    queued = 0
    for patient_id in sorted(patients):
        service.analyses.mark_stale(server, patient_id)  # hooks stop serving it at once
        queued += await service.queue.defer_async(server, patient_id)
    log.info("FHIR notification: %d patient(s), %d job(s) queued", len(patients), queued)
    return JSONResponse({"patients": len(patients), "queued": queued})
