"""CDS Hooks 2.0 cards from an analysis and its explanation.

Rules the EHR side relies on: ``summary`` under 140 characters, ``indicator`` from calibrated
thresholds (an untrained model never raises one above ``info``), a ``source`` that links the
model card, always a ``uuid``, and no empty strings, lists or objects anywhere. The words come
from ``mmcds.explain.summary`` (templates), so the card, the report and the review page say the
same.
"""

from __future__ import annotations

import uuid
from typing import Any

from mmcds.records import Analysis, Explanation
from mmcds.service.outbox import Delivery

OVERRIDE_REASONS = [
    {"code": "disagree", "system": "urn:mmcds:override-reason", "display": "Clinically disagree"},
    {"code": "already-known", "system": "urn:mmcds:override-reason", "display": "Already known"},
    {"code": "poor-input", "system": "urn:mmcds:override-reason", "display": "Inputs inadequate"},
]


def analysis_card(
    analysis: Analysis, explanation: Explanation, model_card_url: str
) -> dict[str, Any]:
    a = analysis.assessment
    return {
        "uuid": str(uuid.uuid4()),
        "summary": explanation.summary_line,
        "indicator": str(a.level),
        "detail": explanation.summary_markdown,
        "source": {"label": f"mmcds {a.model_version}", "url": model_card_url},
        "overrideReasons": OVERRIDE_REASONS,
    }


def unavailable_card(reason: str, model_card_url: str) -> dict[str, Any]:
    """The degraded answer when the patient's data cannot be read at all."""
    return {
        "uuid": str(uuid.uuid4()),
        "summary": "AI risk summary unavailable: patient data could not be retrieved",
        "indicator": "info",
        "detail": f"The decision-support service could not analyse this patient: {reason}. "
        "No assessment was made; nothing here should be read as a negative result.",
        "source": {"label": "mmcds", "url": model_card_url},
    }


def delivery_note(delivery: Delivery | None) -> str:
    """The card's last line: where the report stands, in words that match the outbox state."""
    if delivery is not None and delivery.status == "delivered":
        return f"\n\nWritten back as DiagnosticReport/{delivery.report_id}."
    return (
        "\n\nThe report could not be written back to the EHR yet; it is queued and will be retried."
    )


def in_progress_card(state: str, queued: bool, model_card_url: str) -> dict[str, Any]:
    """A hook's answer while the patient's analysis is not (or no longer) current."""
    why = {
        "stale": "The patient's data changed since the last AI analysis",
        "over-budget": "The patient's data could not be checked within the time allowed",
    }.get(state, "No AI analysis of this patient's current data exists yet")
    then = (
        "it is queued and the report will be written back to the record when done"
        if queued or state == "over-budget"
        else "it is being prepared"
    )
    return {
        "uuid": str(uuid.uuid4()),
        "summary": "AI risk summary: analysis in progress",
        "indicator": "info",
        "detail": f"{why}; {then}. No assessment is shown until it is complete; nothing here "
        "should be read as a negative result.",
        "source": {"label": "mmcds", "url": model_card_url},
    }


def unverified_cards(cards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last stored answer when there was no time to check it is current: said so."""
    note = (
        "\n\n_Not confirmed current: the patient's data could not be checked within the time "
        "allowed, so this analysis may predate the newest results._"
    )
    return [{**card, "detail": card.get("detail", "") + note} for card in cards]
