"""The triage worklist (``/worklist``) behind a clinician login (``/login``).

Recent analyses, the newest per patient, ranked by calibrated risk: critical first, then
warning, then the rest, each by its highest assessed probability. Analyses where no finding
could be assessed (abstained, insufficient inputs, not validated) are listed apart: they carry
no risk to rank by, and a clinician should see them rather than read their absence as "low".

The login is a configured list of clinicians with scrypt password hashes
(``MMCDS_CLINICIANS``); the session is an encrypted, expiring cookie (``tokens.Tokens``),
HttpOnly and SameSite=Strict.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from mmcds.findings import load_catalogue
from mmcds.service.analysis_store import StoredSummary
from mmcds.service.review.tokens import TokenRefused, check_password
from mmcds.service.review.view import LEVEL_ORDER, age_words, label, percent, scores
from mmcds.service.review.web import analyses_of, form, page, settings_of, tokens_of

router = APIRouter(include_in_schema=False)
COOKIE = "mmcds_session"
MAX_ROWS = 500
LEVELS = ("critical", "warning", "info")
AGES = {"1": "last hour", "8": "last 8 hours", "24": "last 24 hours", "72": "last 3 days"}


def _user(request: Request) -> str | None:
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        return None
    try:
        return tokens_of(request).open_session(cookie)
    except TokenRefused:
        return None


@router.get("/login")
def login_page(request: Request) -> Response:
    return page(request, "login.html", {"failed": False})


@router.post("/login")
async def login(request: Request) -> Response:
    fields = await form(request) or {}
    user, password = fields.get("user", ""), fields.get("password", "")
    clinicians = settings_of(request).clinicians
    ok = await run_in_threadpool(check_password, clinicians, user, password)
    if not ok:
        return page(request, "login.html", {"failed": True}, status=401)
    response = RedirectResponse("/worklist", status_code=303)
    settings = settings_of(request)
    response.set_cookie(
        COOKIE,
        tokens_of(request).session(user),
        max_age=settings.session_ttl_s,
        httponly=True,
        samesite="strict",
        secure=settings.public_base_url.startswith("https://"),
        path="/",
    )
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


# Rows by (analysis, finding filter): an analysis never changes, so neither does its row (the
# age and the link are added per request). Bounded by dropping it whole when full.
_ROWS: dict[tuple[str, str | None], dict[str, Any]] = {}
ROW_CACHE = 20_000


def _cached_row(s: StoredSummary, finding: str | None) -> dict[str, Any]:
    if len(_ROWS) > ROW_CACHE:
        _ROWS.clear()
    key = (s.identifier, finding)
    row = _ROWS.get(key)
    if row is None:
        row = _ROWS[key] = _row(s, finding)
    return dict(row)


def _row(s: StoredSummary, finding: str | None) -> dict[str, Any]:
    trained = bool(s.assessment.get("trained"))
    found = [f for f in scores(s.assessment) if finding is None or f.finding == finding]
    assessed = sorted((f for f in found if f.assessed), key=lambda f: -f.probability)
    top = assessed[0] if assessed else None
    level = str(top.level) if top is not None and trained else "info"
    if trained and assessed:
        level = min((str(f.level) for f in assessed), key=LEVEL_ORDER.__getitem__)
    created = (
        s.created_at.replace(tzinfo=UTC)
        if s.created_at and not s.created_at.tzinfo
        else s.created_at
    )
    return {
        "identifier": s.identifier,
        "patient_id": s.patient_id,
        "level": level,
        "probability": top.probability if top else -1.0,
        "top": label(top.finding) if top else "",
        "top_probability": percent(top.probability) if top else "",
        "others": ", ".join(f"{label(f.finding)} {percent(f.probability)}" for f in assessed[1:3]),
        "held": [f"{label(f.finding)}: {f.reason or f.status}" for f in found if not f.assessed],
        "sites": ", ".join(s.assessment.get("sites") or []),
        "subset": s.assessment.get("subset", ""),
        "trained": trained,
        "created": created,
    }


def worklist_rows(
    summaries: list[StoredSummary],
    *,
    finding: str | None = None,
    site: str | None = None,
    level: str | None = None,
    max_age_h: float | None = None,
    now: datetime | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(ranked, apart): the newest analysis of each patient, filtered."""
    now = now or datetime.now(UTC)
    newest: dict[str, StoredSummary] = {}
    for s in summaries:  # newest first already
        newest.setdefault(s.patient_id, s)
    ranked, apart = [], []
    for s in newest.values():
        if site and site not in (s.assessment.get("sites") or []):
            continue
        row = _cached_row(s, finding)
        if (
            max_age_h is not None
            and row["created"]
            and row["created"] < now - timedelta(hours=max_age_h)
        ):
            continue
        if not row["top"] and not row["held"]:
            continue  # filtered by a finding this analysis does not score
        row["age"] = age_words(row["created"], now)
        if row["top"]:
            if level is None or row["level"] == level:
                ranked.append(row)
        elif level is None:
            apart.append(row)
    ranked.sort(key=lambda r: (LEVEL_ORDER[r["level"]], -r["probability"]))
    return ranked, apart


@router.get("/worklist")
def worklist(
    request: Request,
    finding: str = "",
    site: str = "",
    level: str = "",
    age: str = "",
) -> Response:
    user = _user(request)
    if user is None:
        return RedirectResponse("/login", status_code=303)
    summaries = analyses_of(request).recent(limit=MAX_ROWS)
    ranked, apart = worklist_rows(
        summaries,
        finding=finding if finding in load_catalogue() else None,
        site=site or None,
        level=level if level in LEVELS else None,
        max_age_h=float(age) if age in AGES else None,
    )
    tokens = tokens_of(request)
    for row in ranked + apart:
        row["link"] = f"/review/{tokens.review_link(row['identifier'])}"
    sites = sorted({x for s in summaries for x in s.assessment.get("sites") or []})
    context = {
        "user": user,
        "ranked": ranked,
        "apart": apart,
        "findings": [(f.name, f.display) for f in load_catalogue().values()],
        "sites": sites,
        "levels": LEVELS,
        "ages": AGES,
        "chosen": {"finding": finding, "site": site, "level": level, "age": age},
        "total": len(summaries),
    }
    return page(request, "worklist.html", context)
