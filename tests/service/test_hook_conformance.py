"""Every service's responses against the CDS Hooks 2.0 rules, including the specification's own
example requests (../shared/data/cds-hooks-examples), and the order hooks' behaviour."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mmcds.dev.servers import FhirSandbox
from mmcds.findings import finding
from mmcds.records import Analysis, Assessment, Encodings, FindingScore, Patient, PatientRecord
from mmcds.service.cards import alarms, reason_suggestions, with_suggestions
from mmcds.service.conformance import (
    problems_card,
    problems_cards_response,
    problems_discovery,
)
from mmcds.service.hooks import SERVICES, is_imaging_order

EXAMPLES = "cds-hooks-examples"


def _example(shared_data: Path, name: str) -> dict[str, Any]:
    return json.loads((shared_data / EXAMPLES / name).read_text())


def _imaging_order(patient_id: str, order_id: str = "cxr-1") -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "id": order_id,
        "status": "draft",
        "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005"}]}],
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "36643-5"}],
            "text": "XR Chest 2 Views",
        },
        "subject": {"reference": f"Patient/{patient_id}"},
    }


def _order_hook(hook: str, fhir_url: str, patient_id: str, orders: list[Any]) -> dict[str, Any]:
    context: dict[str, Any] = {
        "userId": "Practitioner/1",
        "patientId": patient_id,
        "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": o} for o in orders]},
    }
    if hook == "order-select":
        context["selections"] = [f"{o['resourceType']}/{o['id']}" for o in orders]
    return {
        "hook": hook,
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": fhir_url,
        "context": context,
    }


def test_discovery_lists_every_service_with_prefetch(call_hook: Any) -> None:
    discovery = call_hook.client.get("/cds-services").json()
    assert problems_discovery(discovery) == []
    by_hook = {s["hook"]: s for s in discovery["services"]}
    assert set(by_hook) == {"patient-view", "order-select", "order-sign"}
    for service in discovery["services"]:
        prefetch = service["prefetch"]
        assert prefetch["patient"] == "Patient/{{context.patientId}}"
        assert {"labs", "vitals", "documents", "imaging"} <= set(prefetch)


@pytest.mark.parametrize("hook", ["patient-view", "order-select", "order-sign"])
def test_each_service_answers_conformant_cards(
    hook: str,
    call_hook: Any,
    load_cohort: Callable[[Path | None], list[str]],
    fhir_url: str,
) -> None:
    patient_id = load_cohort(None)[0]
    service = f"mmcds-{hook}"
    if hook == "patient-view":
        body = {
            "hook": hook,
            "hookInstance": str(uuid.uuid4()),
            "fhirServer": fhir_url,
            "context": {"patientId": patient_id, "userId": "Practitioner/1"},
        }
    else:
        body = _order_hook(hook, fhir_url, patient_id, [_imaging_order(patient_id)])
    response = call_hook(body, service=service)
    assert response.status_code == 200, response.text
    assert problems_cards_response(response.json()) == []
    (card,) = response.json()["cards"]
    assert card["overrideReasons"]
    if hook != "patient-view":
        assert "XR Chest 2 Views" in card["detail"]
    # an untrained model never raises a level, so never suggests a reason on order-sign
    assert "suggestions" not in card


def test_order_hooks_say_nothing_about_other_orders(
    call_hook: Any, shared_data: Path, fhir_url: str, fhir_sandbox: FhirSandbox
) -> None:
    # The specification's order-sign example: a medication order, not imaging, in the 1.0
    # context (``medications``); 2.0 requires ``draftOrders``.
    body = _example(shared_data, "docs_examples__00_request.json")
    body["fhirServer"] = fhir_url
    old_style = call_hook(body, service="mmcds-order-sign")
    assert old_style.status_code == 400 and "draftOrders" in old_style.json()["error"]
    medications = body["context"].pop("medications")
    body["context"]["draftOrders"] = {
        "resourceType": "Bundle",
        "entry": [{"resource": m} for m in medications],
    }
    response = call_hook(body, service="mmcds-order-sign")
    assert response.status_code == 200, response.text
    assert response.json() == {"cards": []}
    # order-select with an imaging order that is drafted but not the one selected
    other = _order_hook("order-select", fhir_url, "p", [_imaging_order("p")])
    other["context"]["selections"] = ["MedicationRequest/m1"]
    assert call_hook(other, service="mmcds-order-select").json() == {"cards": []}
    assert fhir_sandbox.requests() == []  # nothing analysed, nothing read


def test_specification_example_requests(
    call_hook: Any,
    shared_data: Path,
    load_cohort: Callable[[Path | None], list[str]],
    fhir_url: str,
) -> None:
    patient_id = load_cohort(None)[0]
    # order-select for an MRA (a LOINC imaging code without a category); patient-view from the
    # quickstart, whose prefetch key is not one of ours (ignored, the data is read instead)
    for name, service in [
        ("docs_examples__02_request.json", "mmcds-order-select"),
        ("docs_quickstart__02_request.json", "mmcds-patient-view"),
    ]:
        body = _example(shared_data, name)
        body["context"]["patientId"] = patient_id
        as_sent = call_hook(body, service=service)
        assert as_sent.status_code == 403, as_sent.text  # its fhirServer is not allow-listed
        body["fhirServer"] = fhir_url
        response = call_hook(body, service=service)
        assert response.status_code == 200, (name, response.text)
        assert problems_cards_response(response.json()) == []
        assert len(response.json()["cards"]) == 1


def test_the_checker_knows_the_rules(shared_data: Path) -> None:
    assert problems_cards_response(_example(shared_data, "docs_examples__03_response.json")) == []
    assert problems_discovery(_example(shared_data, "docs_quickstart__00_discovery.json")) == []
    # the spec's opioid card has neither uuid nor source: both required here
    found = problems_card(_example(shared_data, "docs_examples__01_other.json"))
    assert any("uuid" in p for p in found) and any("source" in p for p in found)
    good = {
        "uuid": str(uuid.uuid4()),
        "summary": "s",
        "indicator": "info",
        "source": {"label": "mmcds"},
    }
    assert problems_cards_response({"cards": [good]}) == []
    breaches = {
        "summary": {**good, "summary": "x" * 140},
        "detail is empty or null": {**good, "detail": None},
        "indicator": {**good, "indicator": "hard-stop"},
        "detail is empty": {**good, "detail": ""},
        "source is empty": {**good, "detail": "d", "source": {}},
        "links is empty": {**good, "links": []},
        "uuid": {**good, "uuid": "card-1"},
        "selectionBehavior": {**good, "suggestions": [{"label": "l", "uuid": str(uuid.uuid4())}]},
        "type must be": {**good, "links": [{"label": "l", "url": "https://x", "type": "relative"}]},
    }
    for words, card in breaches.items():
        problems = problems_cards_response({"cards": [card]})
        assert problems and any(words in p for p in problems), (words, problems)


def _analysis(level_probability: float, status: str = "assessed") -> Analysis:
    score = FindingScore("pneumonia", level_probability, 0.3, 0.9, status=status)  # type: ignore[arg-type]
    assessment = Assessment([score], "m", "v1", trained=True, modalities_used=["image"])
    return Analysis(PatientRecord(patient=Patient("p", None, None)), Encodings(), assessment)


def test_order_sign_suggests_an_assessed_finding_as_the_orders_reason() -> None:
    order = _imaging_order("p")
    order["reasonCode"] = [{"text": "cough"}]
    (suggestion,) = reason_suggestions(alarms(_analysis(0.5)), [order])
    (action,) = suggestion["actions"]
    assert action["type"] == "update"
    reasons = action["resource"]["reasonCode"]
    assert reasons[0] == {"text": "cough"}  # kept
    assert reasons[1]["coding"][0]["code"] == finding("pneumonia").snomed
    assert order["reasonCode"] == [{"text": "cough"}]  # the draft itself is not touched
    card = with_suggestions(
        {
            "uuid": str(uuid.uuid4()),
            "summary": "s",
            "indicator": "warning",
            "source": {"label": "mmcds"},
        },
        [suggestion],
    )
    assert problems_card(card) == []
    # below the warning threshold, not validated, or already the reason: no suggestion
    assert reason_suggestions(alarms(_analysis(0.1)), [order]) == []
    assert reason_suggestions(alarms(_analysis(0.95, "not_validated")), [order]) == []
    coded = copy.deepcopy(order)
    coded["reasonCode"] = reasons
    assert reason_suggestions(alarms(_analysis(0.5)), [coded]) == []


def test_imaging_orders_are_recognised() -> None:
    assert is_imaging_order(_imaging_order("p"))
    mra = {"resourceType": "ServiceRequest", "code": {"text": "MRA Knee Vessels Right"}}
    assert is_imaging_order(mra)
    lab = {"resourceType": "ServiceRequest", "code": {"text": "CBC with differential"}}
    assert not is_imaging_order(lab)
    assert not is_imaging_order({"resourceType": "MedicationRequest", "code": {"text": "CT"}})
    assert {s.hook for s in SERVICES.values()} == {"patient-view", "order-select", "order-sign"}
