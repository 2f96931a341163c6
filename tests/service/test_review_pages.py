"""The review page and the worklist over HTTP (no browser): links from a real hook's card,
refused tokens, the login, feedback from the page into the feedback store, no identifiers in
URLs."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from mmcds.fusion.pipeline import Pipeline
from mmcds.service.api import create_app
from mmcds.service.auth import sign_hook_jwt
from mmcds.service.review.tokens import TokenRefused, Tokens, check_password, hash_password
from mmcds.settings import Settings

PASSWORD = "correct horse battery staple"
CLINICIANS = {"dr.a": hash_password(PASSWORD)}
URL_ATTRS = re.compile(r'(?:href|src|action|data-src)="([^"]*)"')


@pytest.fixture
def reviewed(
    make_settings: Callable[..., Any],
    pipeline: Pipeline,
    fhir_url: str,
    dicomweb: Any,
    load_cohort: Callable[[Path | None], list[str]],
    ehr_key: Any,
    tmp_path: Path,
) -> Iterator[tuple[TestClient, dict[str, Any], list[str]]]:
    """A service that answered a real patient-view hook: (client, the card, patient ids)."""
    ids = load_cohort(None)
    settings = make_settings([fhir_url], dicomweb, home=tmp_path, clinicians=CLINICIANS)
    with TestClient(create_app(settings, pipeline)) as client:
        body = {
            "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "hook": "patient-view",
            "fhirServer": fhir_url,
            "context": {"userId": "Practitioner/1", "patientId": ids[0]},
        }
        response = call(client, settings, ehr_key, body)
        assert response.status_code == 200, response.text
        yield client, response.json()["cards"][0], ids


def call(client: Any, settings: Settings, key: Any, body: dict[str, Any]) -> Any:
    """A patient-view hook as the EHR sends it (JWT for the exact endpoint URL)."""
    path = "/cds-services/mmcds-patient-view"
    (issuer,) = settings.trusted_issuers
    token = sign_hook_jwt(
        key, issuer=issuer, audience=f"{settings.public_base_url}{path}", kid=key.kid
    )
    return client.post(path, json=body, headers={"Authorization": f"Bearer {token}"})


def _path(card: dict[str, Any]) -> str:
    (link,) = card["links"]
    assert link["type"] == "absolute" and link["url"].startswith("http://testserver/review/")
    return link["url"].removeprefix("http://testserver")


def test_card_link_opens_the_review_page_without_identifiers_in_urls(
    reviewed: tuple[TestClient, dict[str, Any], list[str]],
) -> None:
    client, card, ids = reviewed
    path = _path(card)
    assert ids[0] not in path  # the token is opaque: encrypted, not just signed
    page = client.get(path)
    assert page.status_code == 200
    html = page.text
    assert "AI risk summary" in html and "Pneumonia" in html
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    urls = URL_ATTRS.findall(html)
    assert any("/heatmap/" in u for u in urls) and any("/image/" in u for u in urls)
    assert any("/note/" in u for u in urls)
    for url in urls:
        assert ids[0] not in url and "Patient" not in url, url
        assert not re.search(r"\d+\.\d+\.\d+\.\d+", url.split("#")[0]), url  # no DICOM UIDs
    # every asset it names is served by the service itself
    for url in re.findall(r'(?:href|src|data-src)="(/[^"#]*)"', html):
        assert client.get(url).status_code == 200, url


def test_expired_and_forged_links_get_403_and_no_data(
    reviewed: tuple[TestClient, dict[str, Any], list[str]],
) -> None:
    client, card, ids = reviewed
    path = _path(card)
    token = path.rsplit("/", 1)[1]
    tokens: Tokens = client.app.state.review_tokens  # type: ignore[attr-defined]
    grant = tokens.open_review(token)
    expired = tokens.review_link(grant.analysis_id, ttl_s=-1)
    tampered = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    other_key = Tokens.from_settings(
        client.app.state.settings.model_copy(update={"review_secret": SecretStr("x" * 40)})  # type: ignore[attr-defined]
    ).review_link(grant.analysis_id)
    for bad in (expired, tampered, other_key, "not-a-token"):
        for url in (f"/review/{bad}", f"/review/{bad}/note/0", f"/review/{bad}/image/0.png"):
            response = client.get(url)
            assert response.status_code == 403, url
            assert ids[0] not in response.text and "Pneumonia" not in response.text
        posted = client.post(f"/review/{bad}/feedback", data={"outcome": "accepted"})
        assert posted.status_code == 403


def test_override_from_the_page_lands_in_the_feedback_store(
    reviewed: tuple[TestClient, dict[str, Any], list[str]],
) -> None:
    client, card, _ = reviewed
    path = _path(card)
    refused = client.post(f"{path}/feedback", data={"outcome": "overridden", "reason": "nope"})
    assert refused.status_code == 400  # an override needs one of the card's reasons
    done = client.post(
        f"{path}/feedback",
        data={"outcome": "overridden", "reason": "already-known", "comment": "seen on CT"},
        follow_redirects=False,
    )
    assert done.status_code == 303
    store = client.app.state.feedback  # type: ignore[attr-defined]
    (stored,) = store.list()
    assert stored.card_uuid == card["uuid"] and stored.source == "review-page"
    assert stored.outcome == "overridden" and stored.override_reason.code == "already-known"
    assert stored.user_comment == "seen on CT" and stored.analysis_id is not None
    assert "Recorded." in client.get(done.headers["location"]).text


def test_worklist_needs_a_login_and_lists_the_patient(
    reviewed: tuple[TestClient, dict[str, Any], list[str]],
) -> None:
    client, _, ids = reviewed
    assert client.get("/worklist", follow_redirects=False).status_code == 303
    bad = client.post("/login", data={"user": "dr.a", "password": "wrong"})
    assert bad.status_code == 401 and "mmcds_session" not in client.cookies
    client.cookies.set("mmcds_session", "forged")
    assert client.get("/worklist", follow_redirects=False).status_code == 303
    client.cookies.clear()
    good = client.post("/login", data={"user": "dr.a", "password": PASSWORD})
    assert good.status_code == 200 and good.url.path == "/worklist"
    assert ids[0] in good.text
    for url in URL_ATTRS.findall(good.text):
        assert ids[0] not in url, url
    link = re.search(r'href="(/review/[^"]+)"', good.text)
    assert link is not None and client.get(link.group(1)).status_code == 200


def test_passwords_are_checked_against_scrypt_hashes() -> None:
    users = {"a": hash_password("pw-a")}
    assert check_password(users, "a", "pw-a")
    assert not check_password(users, "a", "pw-b")
    assert not check_password(users, "b", "pw-a")
    assert not check_password({"a": "plain-text"}, "a", "plain-text")


def test_session_tokens_do_not_open_review_pages(tmp_path: Path) -> None:
    tokens = Tokens.from_settings(Settings(home=tmp_path))
    session = tokens.session("dr.a")
    with pytest.raises(TokenRefused):
        tokens.open_review(session)
    assert tokens.open_session(session) == "dr.a"
    again = Tokens.from_settings(Settings(home=tmp_path))  # the secret file is reused
    assert again.open_session(session) == "dr.a"
    link = tokens.review_link("abc", ttl_s=1)
    assert tokens.open_review(link).analysis_id == "abc"
    time.sleep(1.1)
    with pytest.raises(TokenRefused):
        tokens.open_review(link)


def _summary(pid: str, hours_ago: float, findings: list[tuple[str, float, str]], site: str) -> Any:
    from datetime import UTC, datetime, timedelta

    from mmcds.service.analysis_store import StoredSummary

    assessment = {
        "trained": True,
        "subset": "image+labs+text",
        "sites": [site],
        "findings": [
            {
                "finding": name,
                "probability": p,
                "warning_threshold": 0.2,
                "critical_threshold": 0.7,
                "status": status,
                "reason": None if status == "assessed" else "inputs outside the validated range",
            }
            for name, p, status in findings
        ],
    }
    created = datetime.now(UTC) - timedelta(hours=hours_ago)
    return StoredSummary(f"id-{pid}-{hours_ago}", pid, assessment, created)


def test_worklist_ranks_critical_first_and_lists_the_unassessed_apart() -> None:
    from mmcds.service.review.worklist import worklist_rows

    summaries = [  # newest first, as the store returns them
        _summary("p-warn-high", 1, [("pneumonia", 0.6, "assessed")], "A"),
        _summary(
            "p-crit", 2, [("pneumonia", 0.75, "assessed"), ("pneumothorax", 0.1, "assessed")], "B"
        ),
        _summary("p-info", 3, [("heart_failure", 0.1, "assessed")], "A"),
        _summary("p-warn-low", 4, [("heart_failure", 0.3, "assessed")], "A"),
        _summary("p-held", 5, [("pneumonia", 0.99, "abstained")], "A"),
        _summary("p-crit", 30, [("pneumonia", 0.01, "assessed")], "B"),  # superseded
    ]
    ranked, apart = worklist_rows(summaries)
    assert [r["patient_id"] for r in ranked] == ["p-crit", "p-warn-high", "p-warn-low", "p-info"]
    assert [r["level"] for r in ranked] == ["critical", "warning", "warning", "info"]
    # an abstained 99% is never ranked as a risk: it is listed apart, with its reason
    assert [r["patient_id"] for r in apart] == ["p-held"]
    assert "outside the validated range" in apart[0]["held"][0]
    by = lambda **kw: [r["patient_id"] for r in worklist_rows(summaries, **kw)[0]]  # noqa: E731
    assert by(site="B") == ["p-crit"]
    assert by(level="warning") == ["p-warn-high", "p-warn-low"]
    assert by(finding="heart_failure") == ["p-warn-low", "p-info"]
    assert worklist_rows(summaries, finding="heart_failure")[1] == []
    assert by(max_age_h=2.5) == ["p-crit", "p-warn-high"]


def test_evidence_shows_direction_and_assertion_when_the_explain_stage_gives_them() -> None:
    from dataclasses import dataclass

    from mmcds.records import EvidenceSpan
    from mmcds.service.review.view import evidence_view

    @dataclass(frozen=True)
    class Labelled(EvidenceSpan):  # the fields issue 21 adds to EvidenceSpan
        direction: str = "supports"
        assertion: str = "affirmed"

    text = "HPI: cough.\nIMPRESSION: No focal consolidation. Fever to 39."
    notes = [{"reference": "DocumentReference/n1", "note_type": "Progress note", "date": None}]
    start = text.index("No focal")
    spans = [
        Labelled("pneumonia", "DocumentReference/n1", "IMPRESSION", start, start + 23,
                 text[start : start + 23], -0.4, "argues_against", "negated"),
        EvidenceSpan("pneumonia", "DocumentReference/n1", None, text.index("Fever"),
                     len(text), "Fever to 39.", 0.3),
    ]  # fmt: skip
    (neg, plain) = evidence_view(spans, notes, {0: text})["pneumonia"]
    assert neg["direction"] == "argues against" and neg["assertion"] == "negated"
    assert neg["before"].endswith("IMPRESSION: ") and neg["note"] == 0
    # without the labels: the direction from the score's sign, no assertion claimed
    assert plain["direction"] == "supports" and plain["assertion"] is None


def test_validation_figures_and_operating_points_in_words() -> None:
    from mmcds.fusion.validation import NEVER, FindingValidation
    from mmcds.records import FindingScore
    from mmcds.service.review.view import operating_point, validation_view

    passed = FindingValidation(120, 30, 0.91, (0.85, 0.96), 1.2, 0.2, 0.12, 0.6, 0.95, 0.7, 0.96,
                               0.91, validated=True, critical_allowed=True)  # fmt: skip
    failed = FindingValidation(120, 3, None, None, 0.0, 0.0, NEVER, NEVER, None, None, None,
                               None, reasons=["too few positives"])  # fmt: skip
    subsets = {"labs+text": {"findings": {"pneumonia": passed.to_json(),
                                          "pneumothorax": failed.to_json()}}}  # fmt: skip
    rows = {r["display"]: r for r in validation_view(subsets, "labs+text")}
    assert rows["Pneumonia"]["auroc"] == "0.910" and rows["Pneumonia"]["ci"] == "0.850–0.960"
    assert rows["Pneumonia"]["sens"] == "95%" and rows["Pneumonia"]["validated"]
    assert not rows["Pneumothorax"]["validated"] and "too few" in rows["Pneumothorax"]["reasons"]
    assert validation_view(subsets, "image+labs+text") == []  # another subset: no figures
    words = operating_point(FindingScore("pneumonia", 0.3, 0.12, NEVER))
    assert "Warning from 12%" in words and "never critical" in words
    held = operating_point(FindingScore("pneumonia", 0.9, 0.1, 0.5, "abstained", "OOD labs"))
    assert "never raises an alert" in held


def test_access_logs_never_carry_a_review_token() -> None:
    import logging

    from mmcds.service.review.web import RedactReviewTokens

    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/review/SECRETTOKEN/image/0.png?preset=lung", "1.1", 200), None,
    )  # fmt: skip
    assert RedactReviewTokens().filter(record)
    assert "SECRETTOKEN" not in record.getMessage()
    assert "/review/<redacted>/image/0.png?preset=lung" in record.getMessage()
    assert any(
        isinstance(f, RedactReviewTokens) for f in logging.getLogger("uvicorn.access").filters
    )
