"""What every endpoint of the service shares: its dependencies, and the admission steps of an
authenticated POST (size bound -> JWT -> JSON body -> model), each refusing with a clear 4xx."""

from __future__ import annotations

import logging
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from mmcds.service.analysis import AnalysisService
from mmcds.service.auth import AuthError, JwtVerifier
from mmcds.service.body import BodyRejected, parse_json_object
from mmcds.service.feedback import FeedbackStore
from mmcds.service.hooks import SERVICES
from mmcds.settings import Settings

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


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


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# --- dependencies: what each endpoint needs, built once per app in create_app ---------------
# ``async`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, and four
# thread hops per hook were a fifth of a warm hook's CPU (py-spy, benchmarks/hook_load.py).


async def app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def analysis_service(request: Request) -> AnalysisService:
    return request.app.state.analysis


async def jwt_verifier(request: Request) -> JwtVerifier:
    return request.app.state.verifier


async def feedback_store(request: Request) -> FeedbackStore:
    return request.app.state.feedback


SettingsDep = Annotated[Settings, Depends(app_settings)]
AnalysisDep = Annotated[AnalysisService, Depends(analysis_service)]
VerifierDep = Annotated[JwtVerifier, Depends(jwt_verifier)]
FeedbackDep = Annotated[FeedbackStore, Depends(feedback_store)]
# The OpenAPI document lists the services; an unknown id is still answered 404 by the handler
# (with the way to discovery), not 422 by FastAPI.
ServiceIdParam = Annotated[
    str,
    PathParam(
        description="a service id from discovery", json_schema_extra={"enum": list(SERVICES)}
    ),
]


# --- admission: the steps every authenticated POST shares ------------------------------------


class Refused(Exception):
    """A call answered with an HTTP error before any work."""

    def __init__(self, response: JSONResponse) -> None:
        self.response = response


async def admit(
    request: Request, settings: Settings, verifier: JwtVerifier, path: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(JWT claims, JSON body) of a call to ``path``; ``Refused`` with 413/401/400 otherwise.
    The JWT's ``aud`` must be this exact endpoint's public URL."""
    body = await _read_bounded(request, settings.max_request_bytes)
    if body is None:
        raise Refused(error(413, f"request body over {settings.max_request_bytes} bytes"))
    endpoint = f"{settings.public_base_url.rstrip('/')}{path}"
    try:
        claims = await verifier.verify_async(request.headers.get("authorization"), endpoint)
    except AuthError as exc:
        log.warning("%s rejected: %s", path, exc)
        raise Refused(JSONResponse({}, status_code=401)) from exc
    try:
        return claims, parse_json_object(body, request.headers.get("content-type"))
    except BodyRejected as exc:
        raise Refused(error(400, str(exc))) from exc


def validated(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise Refused(error(400, f"invalid {model.__name__}: {problems}"[:500])) from exc


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` naming ``model`` as the request body."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}
