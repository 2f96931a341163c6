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

from mmcds.explain.wording import plain_line
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
