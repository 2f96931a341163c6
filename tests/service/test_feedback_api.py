"""Feedback on a real card: stored once, linked to the card's analysis, listed by the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from mmcds.cli import app as cli
from mmcds.settings import get_settings

FEEDBACK = "/cds-services/mmcds-patient-view/feedback"


def _hook(fhir_url: str, patient_id: str) -> dict[str, Any]:
    return {
        "hook": "patient-view",
        "hookInstance": "6c1e6f0e-61a0-4f3a-8f5b-7d0c5c4f1e21",
        "fhirServer": fhir_url,
        "context": {"patientId": patient_id, "userId": "Practitioner/1"},
    }


def _overridden(card: dict[str, Any], when: str) -> dict[str, Any]:
    reason = card["overrideReasons"][0]
    return {
        "card": card["uuid"],
        "outcome": "overridden",
        "overrideReason": {"reason": reason, "userComment": "seen on my own read"},
        "outcomeTimestamp": when,
    }


def test_feedback_is_idempotent_and_linked_to_the_analysis(
    call_hook: Any,
    load_cohort: Callable[[Path | None], list[str]],
    fhir_url: str,
    monkeypatch: Any,
) -> None:
    patient_id = load_cohort(None)[0]
    (card,) = call_hook(_hook(fhir_url, patient_id)).json()["cards"]
    assert card["overrideReasons"] and card["uuid"]

    item = _overridden(card, "2026-12-02T10:15:00Z")
    first = call_hook.post(FEEDBACK, {"feedback": [item]})
    assert first.status_code == 200, first.text
    assert first.json() == {"recorded": 1, "duplicates": 0}
    # the EHR retries (a new JWT, the same feedback), and sends the same instant in +01:00
    again = call_hook.post(FEEDBACK, {"feedback": [item]})
    assert again.json() == {"recorded": 0, "duplicates": 1}
    same = _overridden(card, "2026-12-02T11:15:00+01:00")
    assert call_hook.post(FEEDBACK, {"feedback": [same]}).json()["duplicates"] == 1
    accepted = {
        "card": card["uuid"],
        "outcome": "accepted",
        "outcomeTimestamp": "2026-12-02T10:20Z",
    }
    assert call_hook.post(FEEDBACK, {"feedback": [accepted]}).json()["recorded"] == 1

    state = call_hook.client.app.state
    stored = state.feedback.list(service_id="mmcds-patient-view")
    assert [f.outcome for f in stored] == ["accepted", "overridden"]
    analysis_id = stored[0].analysis_id
    assert analysis_id is not None and stored[1].analysis_id == analysis_id
    assert state.analysis.analyses.get(analysis_id).patient_id == patient_id
    assert stored[1].override_reason.code == card["overrideReasons"][0]["code"]
    assert stored[1].user_comment == "seen on my own read"

    # `mmcds feedback` lists them from the same database
    monkeypatch.setenv("MMCDS_DATABASE_URL", state.settings.database_url)
    get_settings.cache_clear()
    try:
        listed = CliRunner().invoke(cli, ["feedback", "--json", "--analysis", analysis_id])
    finally:
        get_settings.cache_clear()
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert [r["outcome"] for r in rows] == ["accepted", "overridden"]
    assert rows[1]["override_reason"]["code"] == card["overrideReasons"][0]["code"]


def test_bad_feedback_gets_clear_errors(call_hook: Any) -> None:
    card = "0f5e2c1a-2b3c-4d5e-8f90-1a2b3c4d5e6f"
    cases = {
        "accepted with a reason": {
            "card": card,
            "outcome": "accepted",
            "overrideReason": {"userComment": "x"},
            "outcomeTimestamp": "2026-12-02T10:00:00Z",
        },
        "unknown outcome": {"card": card, "outcome": "ignored", "outcomeTimestamp": "2026-12-02"},
        "no timestamp": {"card": card, "outcome": "accepted"},
        "bad timestamp": {"card": card, "outcome": "accepted", "outcomeTimestamp": "yesterday"},
        "a reason the card did not offer": {
            "card": card,
            "outcome": "overridden",
            "overrideReason": {"reason": {"code": "because", "system": "urn:attacker"}},
            "outcomeTimestamp": "2026-12-02T10:00:00Z",
        },
    }
    for name, item in cases.items():
        response = call_hook.post(FEEDBACK, {"feedback": [item]})
        assert response.status_code == 400, (name, response.text)
        assert response.json()["error"]
    assert call_hook.post(FEEDBACK, {"feedback": []}).status_code == 400
    unknown = call_hook.post("/cds-services/nope/feedback", {"feedback": []})
    assert unknown.status_code == 404
    assert call_hook.client.app.state.feedback.list() == []
