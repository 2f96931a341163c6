"""What the review page and the worklist show, built from a stored analysis: plain dicts for
the templates, with every word traceable to a number in the analysis (the card's own words
from ``mmcds.explain.summary``, so the card and the page never disagree)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mmcds.explain.summary import LIMITS, MODALITY_WORDS, UNTRAINED, card_words
from mmcds.findings import UnknownFinding, display
from mmcds.fusion.validation import NEVER
from mmcds.records import EvidenceSpan, FindingScore, LabContribution
from mmcds.service.analysis_store import StoredAnalysis
from mmcds.service.review.charts import contribution_bars, trend

CONTEXT_CHARS = 120  # characters of the note shown around an evidence span
EVIDENCE_PER_FINDING = 5
LEVEL_ORDER = {"critical": 0, "warning": 1, "info": 2}
STATUS_WORDS = {
    "not_validated": "not validated",
    "insufficient_inputs": "insufficient inputs",
    "abstained": "abstained",
}


def label(name: str) -> str:
    """A finding's display text; a name no catalogue knows (an old analysis) shows as is."""
    try:
        return display(name)
    except UnknownFinding:
        return name


def percent(p: float | None) -> str:
    if p is None:
        return "–"
    return "<1%" if p < 0.01 else f"{p * 100:.0f}%"


def scores(assessment: dict[str, Any]) -> list[FindingScore]:
    return [
        FindingScore(
            f["finding"],
            f["probability"],
            f["warning_threshold"],
            f["critical_threshold"],
            f.get("status", "assessed"),
            f.get("reason"),
        )
        for f in assessment["findings"]
    ]


def operating_point(f: FindingScore) -> str:
    """The thresholds in force, in plain words."""
    if not f.assessed:
        return "No operating point applies: this finding never raises an alert here."
    warn = (
        f"Warning from {percent(f.warning_threshold)} (set on validation to catch most cases while "
        "sparing most patients without the finding: see the validation figures below)"
    )
    if f.critical_threshold >= NEVER:
        return warn + "; never critical for these inputs (no validated high-specificity point)."
    return (
        warn + f"; critical from {percent(f.critical_threshold)} "
        "(set for high specificity: few false alarms)."
    )


def findings_view(assessment: dict[str, Any]) -> list[dict[str, Any]]:
    all_scores = scores(assessment)
    trained = bool(assessment.get("trained"))
    flagged = [f for f in all_scores if f.assessed and trained]
    words = card_words(flagged)
    out = []
    for f in sorted(all_scores, key=lambda s: (not s.assessed, -s.probability)):
        out.append(
            {
                "name": f.finding,
                "display": label(f.finding),
                "probability": percent(f.probability),
                "level": str(f.level) if trained else "info",
                "assessed": f.assessed,
                "status": STATUS_WORDS.get(f.status, f.status),
                "reason": f.reason,
                "words": words.get(f.finding, "score (untrained model)" if not trained else ""),
                "operating_point": operating_point(f),
            }
        )
    return out


def missing_view(assessment: dict[str, Any]) -> list[str]:
    used = set(assessment.get("modalities_used", []))
    lines = [
        f"No {MODALITY_WORDS[m]} available" for m in ("image", "text", "labs") if m not in used
    ]
    lines += [
        f"{MODALITY_WORDS.get(m['modality'], m['modality']).capitalize()}: {m['reason']}"
        for m in assessment.get("missing", [])
    ]
    lines += [
        f"{MODALITY_WORDS.get(m, m).capitalize()} not used by this model"
        for m in assessment.get("unused_modalities", [])
    ]
    lines += [
        f"{MODALITY_WORDS.get(m, m).capitalize()} outside what the model was validated on: {why}"
        for m, why in assessment.get("out_of_distribution", {}).items()
    ]
    return lines


def direction(e: EvidenceSpan) -> str:
    """Supports / argues against: the explain stage's label when it gives one, else the sign
    of the span's effect on the finding's logit (which is what the label is made from)."""
    given = getattr(e, "direction", None)
    if given:
        return str(given).replace("_", " ")
    return "supports" if e.score >= 0 else "argues against"


def assertion(e: EvidenceSpan) -> str | None:
    """Negated / uncertain / historical / family, when the explain stage says so; nothing for
    an affirmed sentence (or a stage that does not label assertions)."""
    given = getattr(e, "assertion", None)
    return None if given in (None, "", "affirmed", "present") else str(given)


def evidence_view(
    evidence: list[EvidenceSpan], notes: list[dict[str, Any]], texts: dict[int, str]
) -> dict[str, list[dict[str, Any]]]:
    """Per finding, its strongest spans with the note text around them."""
    index = {n["reference"]: i for i, n in enumerate(notes)}
    by_finding: dict[str, list[dict[str, Any]]] = {}
    for k, e in enumerate(evidence):
        i = index.get(e.note_ref)
        text = texts.get(i) if i is not None else None
        if text is not None and text[e.start : e.end] == e.text:
            before = text[max(0, e.start - CONTEXT_CHARS) : e.start]
            after = text[e.end : e.end + CONTEXT_CHARS]
        else:
            before = after = ""
        meta = notes[i] if i is not None else {}
        by_finding.setdefault(e.finding, []).append(
            {
                "id": k,
                "note": i,
                "note_type": meta.get("note_type") or "Note",
                "date": (meta.get("date") or "")[:10],
                "section": e.section,
                "before": ("…" if e.start > CONTEXT_CHARS else "") + before,
                "span": e.text,
                "after": after + ("…" if text and e.end + CONTEXT_CHARS < len(text) else ""),
                "direction": direction(e),
                "assertion": assertion(e),
                "score": e.score,
            }
        )
    return {
        f: sorted(spans, key=lambda s: -abs(s["score"]))[:EVIDENCE_PER_FINDING]
        for f, spans in by_finding.items()
    }


def _flag(c: LabContribution) -> str:
    if c.interpretation:
        return c.interpretation
    if c.value is None:
        return ""
    if c.ref_low is not None and c.value < c.ref_low:
        return "L"
    if c.ref_high is not None and c.value > c.ref_high:
        return "H"
    return "N" if c.ref_low is not None or c.ref_high is not None else ""


def labs_view(
    labs: list[LabContribution], series: dict[str, list[list[Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """Per finding, the measured labs by the size of their contribution."""
    out: dict[str, list[dict[str, Any]]] = {}
    for c in sorted(labs, key=lambda c: -abs(c.contribution)):
        if c.value is None:
            continue
        points = [(datetime.fromisoformat(t), float(v)) for t, v in series.get(c.lab, [])]
        ref = (
            f"{c.ref_low:.3g}–{c.ref_high:.3g}"
            if c.ref_low is not None and c.ref_high is not None
            else ""
        )
        shown = label(c.finding)
        out.setdefault(c.finding, []).append(
            {
                "lab": c.lab,
                "value": f"{c.value:.3g}",
                "unit": c.unit or "",
                "ref": ref,
                "flag": _flag(c),
                "time": c.time.isoformat(timespec="minutes") if c.time else "",
                "points": f"{c.contribution * 100:+.1f}",
                "direction": "raises" if c.contribution > 0 else "lowers",
                "trend": trend(
                    points, c.ref_low, c.ref_high, f"{c.lab} over the window, {len(points)} values"
                ),
                "n": len(points),
                "finding_display": shown,
            }
        )
    return out


def validation_view(subsets: dict[str, Any], subset: str) -> list[dict[str, Any]]:
    """This site's validation figures for the subset of inputs in force, per finding."""
    found = subsets.get(subset) or {}
    rows = []
    for name, v in (found.get("findings") or {}).items():
        ci = v.get("auroc_ci")
        rows.append(
            {
                "display": label(name),
                "n": v.get("n"),
                "positives": v.get("positives"),
                "auroc": f"{v['auroc']:.3f}" if v.get("auroc") is not None else "–",
                "ci": f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "–",
                "sens": percent(v.get("warning_sensitivity")),
                "spec": percent(v.get("warning_specificity")),
                "crit_spec": percent(v.get("critical_specificity")),
                "validated": bool(v.get("validated")),
                "reasons": "; ".join(v.get("reasons") or []),
            }
        )
    return rows


@dataclass
class Inputs:
    """The review material stored with the analysis (``analysis_store.record_blobs``)."""

    images: list[dict[str, Any]]
    notes: list[dict[str, Any]]
    labs: dict[str, list[list[Any]]]

    @classmethod
    def parse(cls, raw: bytes | None) -> Inputs:
        data = json.loads(raw) if raw else {}
        return cls(data.get("images", []), data.get("notes", []), data.get("labs", {}))


def images_view(stored: StoredAnalysis, inputs: Inputs) -> list[dict[str, Any]]:
    """Per image (by position, never by UID in a URL), its layers per finding and method."""
    out = []
    uids = [im["sop_uid"] for im in inputs.images] or sorted(
        {s.sop_uid for s in stored.explanation.images}
    )
    for i, uid in enumerate(uids):
        maps = [s for s in stored.explanation.images if s.sop_uid == uid]
        if not maps:
            continue
        h, w = maps[0].original_shape  # boxes are in its pixels; heatmap layers stretch to it
        meta = inputs.images[i] if i < len(inputs.images) else {}
        layers = [
            {
                "finding": s.finding,
                "display": label(s.finding),
                "method": s.method,
                "method_words": "CNN Grad-CAM" if s.method.endswith("cnn") else "ViT rollout",
                "boxes": [
                    {"x": b[0], "y": b[1], "w": b[2] - b[0], "h": b[3] - b[1]} for b in s.boxes
                ],
            }
            for s in maps
        ]
        out.append(
            {
                "index": i,
                "width": w,
                "height": h,
                "has_pixels": i < len(inputs.images),
                "view": meta.get("view") or "",
                "site": meta.get("site") or "",
                "acquired": (meta.get("acquired") or "")[:16],
                "layers": layers,
                # the CNN's map first: it is the one that localises (README, Figures)
                "methods": sorted({s.method for s in maps}, key=lambda m: not m.endswith("cnn")),
            }
        )
    return out


def modalities_view(stored: StoredAnalysis) -> list[dict[str, Any]]:
    out = []
    for m in stored.explanation.modalities:
        name = label(m.finding)
        caption = f"Weight of each input for {name}, in percentage points of probability"
        out.append(
            {
                "display": name,
                "base": percent(m.base),
                "full": percent(m.full),
                "chart": contribution_bars(m.values, caption),
            }
        )
    return out


def review_context(
    stored: StoredAnalysis,
    inputs: Inputs,
    texts: dict[int, str],
    subsets: dict[str, Any],
) -> dict[str, Any]:
    a = stored.assessment
    findings = findings_view(a)
    return {
        "patient_id": stored.patient_id,
        "created": age_words(stored.created_at),
        "created_at": stored.created_at.isoformat(timespec="minutes") if stored.created_at else "",
        "trained": bool(a.get("trained")),
        "untrained_words": UNTRAINED,
        "model": f"{a.get('model_id', '')} {a.get('model_version', '')}".strip(),
        "calibration": a.get("calibration", "none"),
        "subset": a.get("subset") or "+".join(sorted(a.get("modalities_used", []))),
        "summary_line": stored.explanation.summary_line,
        "findings": findings,
        "not_assessed": [f for f in findings if not f["assessed"]],
        "missing": missing_view(a),
        "limits": LIMITS,
        "images": images_view(stored, inputs),
        "evidence": evidence_view(stored.explanation.evidence, inputs.notes, texts),
        "labs": labs_view(stored.explanation.labs, inputs.labs),
        "modalities": modalities_view(stored),
        "validation": validation_view(subsets, a.get("subset", "")),
    }


def age_words(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return ""
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    minutes = int(((now or datetime.now(UTC)) - when).total_seconds() // 60)
    if minutes < 60:
        return f"{max(minutes, 0)} min ago"
    if minutes < 48 * 60:
        return f"{minutes // 60} h ago"
    return f"{minutes // 1440} days ago"
