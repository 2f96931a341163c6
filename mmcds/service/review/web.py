"""What the review pages share: templates, the token keeper, the stores, page headers, and
form bodies read without a multipart dependency."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from mmcds.service.analysis_store import AnalysisStore
from mmcds.service.feedback import FeedbackStore
from mmcds.service.review.tokens import Tokens
from mmcds.settings import Settings

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
# Every asset the pages use, read once; served by name from this fixed set only.
STATIC: dict[str, tuple[bytes, str]] = {
    p.name: (p.read_bytes(), "text/css" if p.suffix == ".css" else "text/javascript")
    for p in (HERE / "static").iterdir()
    if p.suffix in (".css", ".js")
}
MAX_FORM_BYTES = 16_000

# Same-origin assets only, no inline script; the URL (a capability) never leaves as a Referer.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


_TOKEN_IN_PATH = re.compile(r"(/review/)[^/?#\s]+")


class RedactReviewTokens(logging.Filter):
    """Access logs show ``/review/<redacted>``: a review token opens a patient's page, so it
    is a credential and never goes into a log (DESIGN §6)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN_IN_PATH.sub(r"\1<redacted>", a) if isinstance(a, str) else a
                for a in record.args
            )
        return True


_access = logging.getLogger("uvicorn.access")
if not any(isinstance(f, RedactReviewTokens) for f in _access.filters):
    _access.addFilter(RedactReviewTokens())


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def tokens_of(request: Request) -> Tokens:
    state = request.app.state
    if getattr(state, "review_tokens", None) is None:
        state.review_tokens = Tokens.from_settings(state.settings)
    return state.review_tokens


def analyses_of(request: Request) -> AnalysisStore:
    return request.app.state.analysis.analyses


def feedback_of(request: Request) -> FeedbackStore:
    return request.app.state.feedback


def page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, context, status_code=status)
    response.headers.update(HEADERS)
    return response


def denied(request: Request) -> HTMLResponse:
    """The same page, with no data, for an expired, forged or unknown link."""
    return page(request, "denied.html", {}, status=403)


def png(data: bytes) -> Response:
    # private: the image is the patient's; cached only by this browser, for this page's life
    headers = {**HEADERS, "Cache-Control": "private, max-age=300"}
    return Response(data, media_type="image/png", headers=headers)


async def form(request: Request) -> dict[str, str] | None:
    """An urlencoded form body (first value of each field); None when too large."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}
