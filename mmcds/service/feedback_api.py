"""``POST /cds-services/{id}/feedback`` (CDS Hooks 2.0 §Feedback): JWT-verified like a hook,
stored once per (card, outcome, outcomeTimestamp), linked to the card's analysis."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from mmcds.service.admission import (
    FeedbackDep,
    Refused,
    ServiceIdParam,
    SettingsDep,
    VerifierDep,
    admit,
    error,
    json_body,
    validated,
)
from mmcds.service.cards import OVERRIDE_REASONS
from mmcds.service.feedback import Feedback, OverrideReason
from mmcds.service.hooks import SERVICES
from mmcds.service.schema import ErrorBody, FeedbackItem, FeedbackRequest

log = logging.getLogger(__name__)
OFFERED = {(r["system"], r["code"]) for r in OVERRIDE_REASONS}
router = APIRouter()


class FeedbackAnswer(BaseModel):
    recorded: int
    duplicates: int


def _feedback(service_id: str, item: FeedbackItem) -> Feedback:
    reason = item.overrideReason.reason if item.overrideReason else None
    if item.outcome == "accepted" and item.overrideReason is not None:
        raise Refused(error(400, "an accepted card carries no overrideReason"))
    if item.outcome == "overridden" and item.acceptedSuggestions:
        raise Refused(error(400, "an overridden card carries no acceptedSuggestions"))
    if reason is not None and (reason.system, reason.code) not in OFFERED:
        # CDS Hooks 2.0: the reason SHALL be one the card offered (every card offers the same)
        raise Refused(error(400, f"overrideReason {reason.code!r} is not one the cards offer"))
    return Feedback(
        service_id=service_id,
        card_uuid=item.card,
        outcome=item.outcome,
        outcome_timestamp=item.outcomeTimestamp,
        accepted_suggestions=tuple(s.id for s in item.acceptedSuggestions or []),
        override_reason=OverrideReason(reason.code, reason.system, reason.display)
        if reason
        else None,
        user_comment=item.overrideReason.userComment if item.overrideReason else None,
    )


@router.post(
    "/cds-services/{service_id}/feedback",
    response_model=FeedbackAnswer,
    responses={
        400: {"model": ErrorBody, "description": "the feedback cannot be used"},
        401: {"description": "JWT missing or not acceptable (no detail given)"},
        404: {"model": ErrorBody, "description": "unknown service"},
        413: {"model": ErrorBody, "description": "request body too large"},
    },
    openapi_extra=json_body(FeedbackRequest),
)
async def feedback(
    service_id: ServiceIdParam,
    request: Request,
    settings: SettingsDep,
    verifier: VerifierDep,
    store: FeedbackDep,
) -> Any:
    if service_id not in SERVICES:
        return error(404, f"unknown CDS service {service_id!r}; see GET /cds-services")
    try:
        claims, data = await admit(
            request, settings, verifier, f"/cds-services/{service_id}/feedback"
        )
        items = [_feedback(service_id, i) for i in validated(FeedbackRequest, data).feedback]
    except Refused as refused:
        return refused.response
    recorded = 0
    for item in items:
        recorded += bool(await run_in_threadpool(store.record, item))
    log.info(
        "feedback jti=%s: %d recorded, %d duplicate",
        claims.get("jti"),
        recorded,
        len(items) - recorded,
    )
    return FeedbackAnswer(recorded=recorded, duplicates=len(items) - recorded)
