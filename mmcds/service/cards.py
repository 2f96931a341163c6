"""CDS Hooks 2.0 cards from an analysis and its explanation.

Rules the EHR side relies on: ``summary`` under 140 characters, ``indicator`` from calibrated
thresholds (an untrained model never raises one above ``info``), a ``source`` that links the
model card, always a ``uuid``, and no empty strings, lists or objects anywhere. The words come
from ``mmcds.explain.summary`` (templates), so the card, the report and the review page say the
same.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

from mmcds.explain.wording import plain_line
from mmcds.findings import finding
from mmcds.records import Analysis, Explanation, Level
from mmcds.service.outbox import Delivery

SNOMED = "http://snomed.info/sct"
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
    """The degraded answer when the patient's data cannot be read at all; ``reason`` is said in
    one plain line (the full error stays in the log)."""
    return {
        "uuid": str(uuid.uuid4()),
        "summary": "AI risk summary unavailable: patient data could not be retrieved",
        "indicator": "info",
        "detail": "The decision-support service could not analyse this patient: "
        f"{plain_line(reason)}. "
        "No assessment was made; nothing here should be read as a negative result.",
        "source": {"label": "mmcds", "url": model_card_url},
    }


def delivery_note(delivery: Delivery | None) -> str:
    """The card's last line: where the report stands, in words true of the outbox state (a
    clinician must never read "will be retried" about a report nobody will retry)."""
    if delivery is None:
        return "\n\nThe report has not been written back to the EHR."
    if delivery.status == "delivered":
        line = f"\n\nWritten back as DiagnosticReport/{delivery.report_id}."
        if delivery.note and delivery.note.startswith("overlays left out"):
            line += " The saliency images were left out of it (too large for the EHR)."
        return line
    if delivery.status == "rejected":
        return (
            "\n\nThe EHR refused the report, so it was not written back; it will not be "
            "retried until an administrator fixes the cause (they have been alerted)."
        )
    if delivery.status == "dead":
        return (
            f"\n\nThe report could not be written back after {delivery.attempts} attempts and "
            "is no longer retried; an administrator has been alerted."
        )
    return (
        "\n\nThe report could not be written back to the EHR yet; it is queued and will be retried."
    )


def order_card(card: dict[str, Any], orders: list[dict[str, Any]]) -> dict[str, Any]:
    """The analysis card shown beside draft imaging orders: same findings and evidence, with
    the orders it was shown for named in the detail."""
    names = ", ".join(_order_name(o) for o in orders)
    detail = f"{card['detail']}\n\nShown while ordering: {names}."
    return {**card, "uuid": str(uuid.uuid4()), "detail": detail}


def _order_name(order: dict[str, Any]) -> str:
    code = order.get("code") or {}
    coding: dict[str, Any] = next(iter(code.get("coding") or []), {})
    return str(code.get("text") or coding.get("display") or coding.get("code") or "imaging order")


def alarms(analysis: Analysis) -> list[str]:
    """The findings that alarm: assessed (validated, in distribution, enough inputs) and at
    ``warning`` or above."""
    return [f.finding for f in analysis.assessment.findings if f.assessed and f.level != Level.info]


def stored_alarms(assessment: dict[str, Any]) -> list[str]:
    """``alarms`` of a stored analysis (``AnalysisStore``'s assessment record)."""
    return [
        f["finding"]
        for f in assessment.get("findings", [])
        if f.get("status") == "assessed" and f.get("level") != str(Level.info)
    ]


def reason_suggestions(alarms: list[str], orders: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """order-sign: per alarming finding (``AnalysisResult.alarms``: assessed, at ``warning`` or
    above) and per order that does not carry it yet, a suggestion to add it as the order's
    ``reasonCode`` (an ``update`` action on the draft ServiceRequest). Findings not assessed
    (not validated, abstained, too few inputs) never alarm, so never suggest (DESIGN §8)."""
    suggestions = []
    for name in alarms:
        entry = finding(name)
        for order in orders:
            present = {
                c.get("code") for r in order.get("reasonCode") or [] for c in r.get("coding") or []
            }
            if entry.snomed in present:
                continue
            updated = copy.deepcopy(order)
            updated["reasonCode"] = [
                *(order.get("reasonCode") or []),
                {
                    "coding": [{"system": SNOMED, "code": entry.snomed, "display": entry.display}],
                    "text": f"{entry.display} (suspected; AI-assisted, preliminary)",
                },
            ]
            suggestions.append(
                {
                    "label": f"Add suspected {entry.display.lower()} as the reason for "
                    f"{_order_name(order)}"[:120],
                    "uuid": str(uuid.uuid4()),
                    "actions": [
                        {
                            "type": "update",
                            "description": f"Add {entry.display} (SNOMED {entry.snomed}) "
                            "to the order's reasonCode",
                            "resource": updated,
                        }
                    ],
                }
            )
    return suggestions


def with_suggestions(card: dict[str, Any], suggestions: list[dict[str, Any]]) -> dict[str, Any]:
    """Suggestions need a ``selectionBehavior`` (CDS Hooks 2.0); none: the card unchanged."""
    if not suggestions:
        return card
    return {**card, "suggestions": suggestions, "selectionBehavior": "any"}


def card_uuids(card: dict[str, Any]) -> list[str]:
    """The card's uuid and its suggestions': what feedback may name."""
    return [card["uuid"], *(s["uuid"] for s in card.get("suggestions") or [])]


def in_progress_card(state: str, queued: bool, model_card_url: str) -> dict[str, Any]:
    """A hook's answer while the patient's analysis is not (or no longer) current."""
    why = {
        "stale": "The patient's data changed since the last AI analysis",
        "over-budget": "The patient's data could not be checked within the time allowed",
    }.get(state, "No AI analysis of this patient's current data exists yet")
    pending = queued or state == "over-budget"
    then = (
        "it is queued and the report will be written back to the record when done"
        if pending
        # no work queue (MMCDS_QUEUE_URL): nothing will run it until `mmcds ingest` does
        else "no work queue is configured, so it runs only when the patient is ingested"
    )
    return {
        "uuid": str(uuid.uuid4()),
        "summary": "AI risk summary: analysis in progress"
        if pending
        else "AI risk summary: not analysed yet",
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
