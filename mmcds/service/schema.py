"""CDS Hooks 2.0 request and response bodies as pydantic models.

They are what the OpenAPI document shows, and what requests are validated against (after
``mmcds.service.body`` has parsed the bytes). Optional members default to ``None`` and are left
out of every response (``response_model_exclude_none``), never sent as ``null``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# --- requests ---------------------------------------------------------------------------------


class FhirAuthorization(BaseModel):
    # Sent as an HTTP header to the FHIR server: printable ASCII only (RFC 6750 b64token),
    # so a hostile token cannot break the request (found by the schemathesis run).
    access_token: str = Field(min_length=1, max_length=16_384, pattern=r"^[\x21-\x7e]+$")
    token_type: Literal["Bearer", "bearer"] = "Bearer"
    expires_in: int | None = None
    scope: str | None = None
    subject: str | None = None


class HookContext(BaseModel):
    """What every hook this service answers has in its context; the rest (``draftOrders``,
    ``selections``...) is checked per hook (``mmcds.service.hooks``)."""

    model_config = ConfigDict(extra="allow")

    patientId: str = Field(pattern=r"^[A-Za-z0-9\-\.]{1,64}$", description="a FHIR id")
    userId: str | None = None
    encounterId: str | None = None


class HookRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    hook: Literal["patient-view", "order-select", "order-sign"]
    hookInstance: str
    fhirServer: str | None = None
    fhirAuthorization: FhirAuthorization | None = None
    context: HookContext
    prefetch: dict[str, Any] | None = None


class Coding(BaseModel):
    code: str = Field(min_length=1)
    system: str | None = None
    display: str | None = None


class OverrideReasonIn(BaseModel):
    reason: Coding | None = None
    userComment: str | None = Field(default=None, max_length=4000)


class AcceptedSuggestion(BaseModel):
    id: str = Field(min_length=1, max_length=128)


class FeedbackItem(BaseModel):
    card: str = Field(min_length=1, max_length=128, description="the card's uuid")
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[AcceptedSuggestion] | None = Field(default=None, max_length=50)
    overrideReason: OverrideReasonIn | None = None
    outcomeTimestamp: datetime = Field(description="ISO 8601 instant")


class FeedbackRequest(BaseModel):
    feedback: list[FeedbackItem] = Field(min_length=1, max_length=100)


# --- responses --------------------------------------------------------------------------------


class Source(BaseModel):
    label: str
    url: str | None = None
    topic: Coding | None = None


class Link(BaseModel):
    label: str
    url: str
    type: Literal["absolute", "smart"]
    appContext: str | None = None


class Action(BaseModel):
    type: Literal["create", "update", "delete"]
    description: str
    resource: dict[str, Any] | None = None
    resourceId: list[str] | None = None


class Suggestion(BaseModel):
    label: str
    uuid: str
    isRecommended: bool | None = None
    actions: list[Action] | None = None


class Card(BaseModel):
    uuid: str
    summary: str = Field(max_length=139)
    indicator: Literal["info", "warning", "critical"]
    detail: str | None = None
    source: Source
    suggestions: list[Suggestion] | None = None
    selectionBehavior: Literal["at-most-one", "any"] | None = None
    overrideReasons: list[Coding] | None = None
    links: list[Link] | None = None


class CardsResponse(BaseModel):
    cards: list[Card]


class ServiceDescription(BaseModel):
    id: str
    hook: str
    title: str
    description: str
    prefetch: dict[str, str] | None = None
    usageRequirements: str | None = None


class Discovery(BaseModel):
    services: list[ServiceDescription]


class ErrorBody(BaseModel):
    error: str


class Issue(BaseModel):
    severity: Literal["fatal", "error", "warning", "information"]
    code: str
    diagnostics: str | None = None


class OperationOutcome(BaseModel):
    resourceType: Literal["OperationOutcome"] = "OperationOutcome"
    issue: list[Issue]


def operation_outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return OperationOutcome(
        issue=[Issue(severity="error", code=code, diagnostics=diagnostics)]
    ).model_dump(exclude_none=True)
