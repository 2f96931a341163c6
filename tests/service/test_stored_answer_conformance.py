"""A stored answer's cards are checked once, when stored, instead of on every hook that serves
them: a card that breaks the CDS Hooks 2.0 rules cannot be stored, a row that breaks them
(written around ``put_answer``, e.g. by an older version) is not served, and what a hook serves
from a stored answer, review link included, conforms."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from joserfc.jwk import ECKey

from mmcds.errors import ConfigurationError
from mmcds.service.analysis_store import (
    AnalysisStore,
    NonConformantAnswer,
    StoredAnswer,
    answer_key,
)
from mmcds.service.api import create_app
from mmcds.service.auth import sign_hook_jwt
from mmcds.service.conformance import problems_cards_response
from mmcds.settings import Settings

SettingsFactory = Callable[..., Settings]  # the ``make_settings`` fixture (conftest.py)
ISSUER, KID = "https://ehr.test.mmcds.local", "test-key-1"  # ``ehr_key``'s, as conftest.py

# Allow-listed, never called: with notifications as the currency check a warm hook reads only
# the database.
FHIR = "http://fhir.stored-answers.test/fhir/R4"


def _card(**changes: Any) -> dict[str, Any]:
    card = {
        "uuid": str(uuid.uuid4()),
        "summary": "AI risk summary: nothing assessed above info",
        "indicator": "info",
        "detail": "Preliminary.",
        "source": {"label": "mmcds", "url": "http://cds.test/model-card"},
    }
    return {**card, **changes}


BROKEN = {
    "summary of 140 characters": {"summary": "x" * 140},
    "unknown indicator": {"indicator": "urgent"},
    "uuid not a UUID": {"uuid": "card-1"},
    "empty detail": {"detail": ""},
    "relative link": {"links": [{"label": "Review", "url": "/review/1", "type": "absolute"}]},
}


@pytest.mark.parametrize("change", BROKEN.values(), ids=list(BROKEN))
def test_a_nonconformant_card_cannot_be_stored(change: dict[str, Any], tmp_path: Path) -> None:
    store = AnalysisStore(f"sqlite:///{tmp_path / 's.db'}")
    with pytest.raises(NonConformantAnswer):
        store.put_answer(StoredAnswer(FHIR, "p1", "a" * 64, "f" * 64, [_card(), _card(**change)]))
    assert store.get_answer(FHIR, "p1") is None
    assert store.answer_version(FHIR, "p1") is None
    store.put_answer(StoredAnswer(FHIR, "p1", "a" * 64, "f" * 64, [_card()]))  # a good one is
    assert store.answer_version(FHIR, "p1") == ("a" * 64, "f" * 64)


def test_hooks_serve_stored_answers_that_conform_and_not_a_row_that_does_not(
    make_settings: SettingsFactory, ehr_key: ECKey
) -> None:
    settings = make_settings([FHIR], hook_answer="stored", currency_check="notifications")
    app = create_app(settings)
    store: AnalysisStore = app.state.analysis.analyses
    good = _card()
    store.put_answer(StoredAnswer(FHIR, "good", "a" * 64, "f" * 64, [good]))
    broken = _card(summary="x" * 200)
    with store.engine.begin() as conn:  # around put_answer, as an older version might have
        conn.execute(
            store.answers.insert().values(
                key=answer_key(FHIR, "bad"),
                fhir_server=FHIR,
                patient_id="bad",
                analysis_id="b" * 64,
                fingerprint="f" * 64,
                cards=json.dumps([broken]),
            )
        )
    path = "/cds-services/mmcds-patient-view"
    with TestClient(app) as client:
        answers = {}
        for patient in ("good", "bad"):
            body = {
                "hook": "patient-view",
                "hookInstance": str(uuid.uuid4()),
                "fhirServer": FHIR,
                "context": {"patientId": patient, "userId": "Practitioner/1"},
            }
            token = sign_hook_jwt(
                ehr_key, issuer=ISSUER, audience=f"{settings.public_base_url}{path}", kid=KID
            )
            response = client.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200, response.text
            assert problems_cards_response(response.json()) == []
            (answers[patient],) = response.json()["cards"]
    assert answers["good"]["uuid"] == good["uuid"]  # the stored card, with its review link
    assert [link["type"] for link in answers["good"]["links"]] == ["absolute"]
    assert answers["good"]["links"][0]["url"].startswith(f"{settings.public_base_url}/review/")
    assert answers["bad"]["uuid"] != broken["uuid"]  # not served: answered as not analysed yet
    assert answers["bad"]["summary"] == "AI risk summary: not analysed yet"


def test_the_public_base_url_of_every_review_link_must_be_absolute(
    make_settings: SettingsFactory,
) -> None:
    with pytest.raises(ConfigurationError, match="MMCDS_PUBLIC_BASE_URL"):
        create_app(make_settings([FHIR], public_base_url="cds.example.org"))
