"""The review page of one analysis, opened from the card's link: ``/review/<token>``.

The token (``tokens.Tokens``) is the only thing in the URL; images, heatmaps and notes are
addressed by their position in the analysis, never by UID or reference. An expired, forged or
unknown token gets the same 403 page, with nothing of the analysis on it.
"""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from mmcds.fusion.model import CONFIG_NAME
from mmcds.service.analysis_store import INPUTS, NOTE, PIXELS, StoredAnalysis
from mmcds.service.cards import OVERRIDE_REASONS
from mmcds.service.feedback import Feedback, OverrideReason
from mmcds.service.review.imaging import PRESETS, heatmap_png, windowed_png
from mmcds.service.review.tokens import ReviewGrant, TokenRefused
from mmcds.service.review.view import Inputs, assertion, direction, review_context
from mmcds.service.review.web import (
    STATIC,
    analyses_of,
    denied,
    feedback_of,
    form,
    page,
    png,
    settings_of,
    tokens_of,
)

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)
MAX_COMMENT = 2000


@router.get("/review-static/{name}")
def static(name: str) -> Response:
    found = STATIC.get(name)
    if found is None:
        return Response(status_code=404)
    data, media_type = found
    return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=3600"})


def _grant(request: Request, token: str) -> ReviewGrant | None:
    try:
        return tokens_of(request).open_review(token)
    except TokenRefused as exc:
        log.info("review link refused: %s", exc)  # never the token itself
        return None


def _subsets(settings_fusion_model: str) -> dict[str, Any]:
    """The model's per-subset validation figures (``mmcds train`` / ``mmcds calibrate``)."""
    if not settings_fusion_model:
        return {}
    path = Path(settings_fusion_model) / CONFIG_NAME
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text()).get("subsets") or {})


def _load(request: Request, grant: ReviewGrant) -> tuple[StoredAnalysis, Inputs] | None:
    store = analyses_of(request)
    stored = store.get(grant.analysis_id)
    if stored is None:
        return None
    return stored, Inputs.parse(store.blob(grant.analysis_id, INPUTS))


def _texts(request: Request, grant: ReviewGrant, inputs: Inputs) -> dict[int, str]:
    store = analyses_of(request)
    out = {}
    for i in range(len(inputs.notes)):
        raw = store.blob(grant.analysis_id, f"{NOTE}/{i}")
        if raw is not None:
            out[i] = raw.decode("utf-8")
    return out


def _review(request: Request, token: str) -> Response:
    grant = _grant(request, token)
    loaded = _load(request, grant) if grant else None
    if grant is None or loaded is None:
        return denied(request)
    stored, inputs = loaded
    settings = settings_of(request)
    context = review_context(
        stored, inputs, _texts(request, grant, inputs), _subsets(settings.fusion_model)
    )
    recorded = feedback_of(request).list(analysis_id=grant.analysis_id, limit=20)
    context |= {
        "token": token,
        "presets": list(PRESETS),
        "reasons": OVERRIDE_REASONS,
        "recorded": [
            {
                "outcome": f.outcome,
                "reason": f.override_reason.display if f.override_reason else "",
                "comment": f.user_comment or "",
                "when": f.outcome_timestamp.isoformat(timespec="minutes"),
                "source": f.source,
            }
            for f in recorded
        ],
        "just_recorded": request.query_params.get("recorded") == "1",
        "expires": datetime.fromtimestamp(grant.expires, UTC).isoformat(timespec="minutes"),
    }
    return page(request, "review.html", context)


@router.get("/review/{token}")
async def review(request: Request, token: str) -> Response:
    return await run_in_threadpool(_review, request, token)


@router.get("/review/{token}/image/{index}.png")
def image(request: Request, token: str, index: int, preset: str = "default") -> Response:
    grant = _grant(request, token)
    if grant is None or preset not in PRESETS:
        return Response(status_code=403 if grant is None else 400)
    raw = analyses_of(request).blob(grant.analysis_id, f"{PIXELS}/{index}")
    return png(windowed_png(raw, preset)) if raw else Response(status_code=404)


@router.get("/review/{token}/heatmap/{index}/{finding}/{method}.png")
def heatmap(request: Request, token: str, index: int, finding: str, method: str) -> Response:
    grant = _grant(request, token)
    if grant is None:
        return Response(status_code=403)
    store = analyses_of(request)
    inputs = Inputs.parse(store.blob(grant.analysis_id, INPUTS))
    if not 0 <= index < len(inputs.images):
        return Response(status_code=404)
    uid = inputs.images[index]["sop_uid"]
    raw = store.blob(grant.analysis_id, f"heatmap/{uid}/{finding}/{method}")
    if raw is None:
        return Response(status_code=404)
    return png(heatmap_png(np.load(io.BytesIO(raw), allow_pickle=False)))


def _note_segments(text: str, spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The note as plain and marked segments; overlapping spans share one mark."""
    marks = sorted(
        ((s["start"], s["end"], s) for s in spans if 0 <= s["start"] < s["end"]),
        key=lambda m: (m[0], m[1]),
    )
    segments: list[dict[str, Any]] = []
    pos = 0
    for start, end, span in marks:
        if segments and segments[-1]["mark"] and start < segments[-1]["end"]:
            last = segments[-1]
            last["end"] = max(last["end"], end)
            last["text"] = text[last["start"] : last["end"]]
            last["spans"].append(span)
            pos = last["end"]
            continue
        start = max(start, pos)
        if start > pos:
            segments.append({"mark": False, "text": text[pos:start]})
        segments.append(
            {"mark": True, "start": start, "end": end, "text": text[start:end], "spans": [span]}
        )
        pos = end
    segments.append({"mark": False, "text": text[pos:]})
    return segments


@router.get("/review/{token}/note/{index}")
def note(request: Request, token: str, index: int) -> Response:
    grant = _grant(request, token)
    loaded = _load(request, grant) if grant else None
    if grant is None or loaded is None:
        return denied(request)
    stored, inputs = loaded
    raw = analyses_of(request).blob(grant.analysis_id, f"{NOTE}/{index}")
    if raw is None or not 0 <= index < len(inputs.notes):
        return denied(request)
    text, meta = raw.decode("utf-8"), inputs.notes[index]
    spans = [
        {
            "id": k,
            "start": e.start,
            "end": e.end,
            "finding": e.finding,
            "direction": direction(e),
            "assertion": assertion(e),
        }
        for k, e in enumerate(stored.explanation.evidence)
        if e.note_ref == meta["reference"] and text[e.start : e.end] == e.text
    ]
    context = {
        "token": token,
        "note_type": meta.get("note_type") or "Note",
        "date": (meta.get("date") or "")[:16],
        "segments": _note_segments(text, spans),
    }
    return page(request, "note.html", context)


@router.post("/review/{token}/feedback")
async def post_feedback(request: Request, token: str) -> Response:
    grant = _grant(request, token)
    if grant is None:
        return denied(request)
    fields = await form(request)
    outcome = (fields or {}).get("outcome")
    if fields is None or outcome not in ("accepted", "overridden"):
        return Response("outcome must be accepted or overridden", status_code=400)
    reason = None
    if outcome == "overridden":
        coding = next((r for r in OVERRIDE_REASONS if r["code"] == fields.get("reason")), None)
        if coding is None:
            return Response("an override needs one of the card's reasons", status_code=400)
        reason = OverrideReason(coding["code"], coding["system"], coding["display"])
    comment = (fields.get("comment") or "").strip()[:MAX_COMMENT] or None
    feedback = Feedback(
        service_id=grant.service_id or "mmcds-patient-view",
        # opened from the worklist there is no card: the analysis stands for it
        card_uuid=grant.card_uuid or f"urn:mmcds:analysis:{grant.analysis_id}",
        outcome=outcome,  # type: ignore[arg-type]
        outcome_timestamp=datetime.now(UTC),
        analysis_id=grant.analysis_id,
        override_reason=reason,
        user_comment=comment,
        source="review-page",
    )
    await run_in_threadpool(feedback_of(request).record, feedback)
    return RedirectResponse(f"/review/{token}?recorded=1#feedback", status_code=303)
