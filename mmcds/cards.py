"""CDS Hooks 2.0 cards from an analysis.

Rules the EHR side relies on: ``summary`` under 140 characters, ``indicator`` from calibrated
thresholds (an untrained model never raises one above ``info``), a ``source`` that links the
model card, always a ``uuid``, and no empty strings, lists or objects anywhere.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

from mmcds.findings import BY_NAME
from mmcds.pipeline import Analysis
from mmcds.records import Level, Missing

SUMMARY_LIMIT = 140
UNTRAINED_WARNING = (
    "The fusion model is UNTRAINED: its scores are random and carry no clinical meaning."
)
OVERRIDE_REASONS = [
    {"code": "disagree", "system": "urn:mmcds:override-reason", "display": "Clinically disagree"},
    {"code": "already-known", "system": "urn:mmcds:override-reason", "display": "Already known"},
    {"code": "poor-input", "system": "urn:mmcds:override-reason", "display": "Inputs inadequate"},
]


def _percent(p: float) -> str:
    return "<1%" if p < 0.01 else f"{p * 100:.0f}%"


def _counts(analysis: Analysis) -> str:
    r = analysis.record
    return f"{len(r.images)} image(s), {len(r.notes)} note(s), {len(r.labs)} lab value(s)"


def summary_line(analysis: Analysis) -> str:
    a = analysis.assessment
    if not a.trained:
        text = f"AI risk summary (UNTRAINED model, no clinical meaning): {_counts(analysis)}"
    else:
        flagged = sorted(
            (f for f in a.findings if f.level != Level.info),
            key=lambda f: -f.probability,
        )
        if flagged:
            parts = ", ".join(
                f"{BY_NAME[f.finding].display} {_percent(f.probability)}" for f in flagged[:3]
            )
            text = f"AI (preliminary): possible {parts}"
        else:
            text = "AI (preliminary): no finding above threshold"
    return text if len(text) < SUMMARY_LIMIT else text[: SUMMARY_LIMIT - 2] + "…"


def _missing_lines(missing: list[Missing]) -> list[str]:
    # Group repeated reasons so one missing study does not flood the card.
    grouped = Counter((m.modality, m.reason) for m in missing)
    return [
        f"- {modality}: {reason}" + (f" (×{n})" if n > 1 else "")
        for (modality, reason), n in grouped.items()
    ]


def detail_markdown(analysis: Analysis) -> str:
    a = analysis.assessment
    lines = []
    if not a.trained:
        lines += [f"**{UNTRAINED_WARNING}**", ""]
    lines += [
        "Preliminary decision support; the clinician decides.",
        "",
        "| Finding | Probability | Level |",
        "|---|---|---|",
    ]
    for f in a.findings:
        lines.append(f"| {BY_NAME[f.finding].display} | {_percent(f.probability)} | {f.level} |")
    used = ", ".join(a.modalities_used) or "none"
    lines += ["", f"Inputs analysed: {_counts(analysis)} (modalities: {used})."]
    if analysis.record.missing:
        lines += ["", "**Not available to the model:**", *_missing_lines(analysis.record.missing)]
    lines += ["", f"Model {a.model_id} {a.model_version}, calibration: {a.calibration}."]
    return "\n".join(lines)


def analysis_card(analysis: Analysis, model_card_url: str) -> dict[str, Any]:
    a = analysis.assessment
    return {
        "uuid": str(uuid.uuid4()),
        "summary": summary_line(analysis),
        "indicator": str(a.level),
        "detail": detail_markdown(analysis),
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
