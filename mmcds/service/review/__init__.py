"""The clinician's side: a review page per analysis (``/review/<token>``, opened from the card's
link) and a triage worklist (``/worklist``, behind a clinician login). Server-rendered HTML
(Jinja2) with a little JavaScript; every asset is served by the service."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from mmcds.service.review.pages import router as pages_router
from mmcds.service.review.web import tokens_of
from mmcds.service.review.worklist import router as worklist_router

router = APIRouter(include_in_schema=False)
router.include_router(pages_router)
router.include_router(worklist_router)


def with_review_links(
    request: Request, cards: list[dict[str, Any]], service_id: str, analysis_id: str | None
) -> list[dict[str, Any]]:
    """Each card of an analysis with an ``absolute`` link to its review page. The link's token
    names the card (so the page's Accept/Override is that card's feedback) and expires."""
    if analysis_id is None:
        return cards
    tokens = tokens_of(request)
    base = request.app.state.settings.public_base_url.rstrip("/")
    out = []
    for card in cards:
        token = tokens.review_link(analysis_id, card_uuid=card["uuid"], service_id=service_id)
        link = {"label": "Review the evidence", "url": f"{base}/review/{token}", "type": "absolute"}
        out.append({**card, "links": [*(card.get("links") or []), link]})
    return out


__all__ = ["router", "with_review_links"]
