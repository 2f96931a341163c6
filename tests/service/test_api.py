"""The patient-view hook end to end: real FHIR sandbox, real Orthanc, real models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import ECKey

from mmcds.fhir.client import FhirClient
from mmcds.fhir.dicomweb import DicomWebClient
from mmcds.fhir.gather import gather_patient
from mmcds.fhir.load import load_folder
from mmcds.findings import SYNTH_FINDINGS, finding
from mmcds.fusion.pipeline import Pipeline
from mmcds.service.auth import sign_hook_jwt

ISSUER = "https://ehr.test.mmcds.local"
KID = "test-key-1"
BASE = "http://testserver"
ENDPOINT = f"{BASE}/cds-services/mmcds-patient-view"
HookCaller = Any  # tests/service/conftest.py


def _request(fhir_url: str, patient_id: str | None) -> dict[str, Any]:
    context: dict[str, Any] = {"userId": "Practitioner/test"}
    if patient_id is not None:
        context["patientId"] = patient_id
    return {
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "hook": "patient-view",
        "fhirServer": fhir_url,
        "context": context,
    }


def _load(folder: Path, fhir_url: str, pacs: Any) -> list[str]:
    with (
        FhirClient(fhir_url, timeout=120) as fhir,
        DicomWebClient(pacs.dicomweb_url, auth=pacs.auth) as dicom,
    ):
        result = load_folder(folder, fhir, dicom)
        assert not result.errors, result.errors
        return [p["id"] for p in fhir.search("Patient", {"_count": "50"})]


def _ingest(call_hook: HookCaller, fhir_url: str, *patient_ids: str) -> None:
    """Analyse now, as a queue worker would: the hook then answers from the stored analysis."""
    service = call_hook.client.app.state.analysis  # type: ignore[attr-defined]
    assert service.ingest(fhir_url, list(patient_ids), now=True) == ["analysed"] * len(patient_ids)


def test_hook_writes_back_a_report_with_the_run_values(
    call_hook: HookCaller,
    cohort: Path,
    fhir_url: str,
    dicomweb: Any,
    pipeline: Pipeline,
) -> None:
    patient_id = _load(cohort, fhir_url, dicomweb)[0]
    _ingest(call_hook, fhir_url, patient_id)

    response = call_hook(_request(fhir_url, patient_id))

    assert response.status_code == 200, response.text
    (card,) = response.json()["cards"]
    assert "UNTRAINED" in card["summary"] and len(card["summary"]) < 140
    assert card["indicator"] == "info"  # an untrained model never raises an alarm
    assert "Not available to the model" not in card["detail"]  # image, notes and labs all read
    with (
        FhirClient(fhir_url) as fhir,
        DicomWebClient(dicomweb.dicomweb_url, auth=dicomweb.auth) as pacs,
    ):
        (report,) = fhir.search("DiagnosticReport", {"subject": f"Patient/{patient_id}"})
        assert report["status"] == "preliminary"
        assert report["subject"]["reference"] == f"Patient/{patient_id}"
        assert "UNTRAINED" in report["conclusion"]
        # One saliency overlay (Media -> Binary, PNG) per finding for the patient's one image.
        assert len(report["media"]) == len(SYNTH_FINDINGS)
        media = fhir.read(*report["media"][0]["link"]["reference"].split("/"))
        assert "data" not in media["content"]  # by URL, never inline
        assert fhir.fetch_bytes(media["content"]["url"])[:8] == b"\x89PNG\r\n\x1a\n"
        written = {}
        for ref in report["result"]:
            obs = fhir.read(*ref["reference"].split("/"))
            assert obs["subject"]["reference"] == f"Patient/{patient_id}"
            written[obs["code"]["coding"][0]["code"]] = obs["valueQuantity"]["value"]
        # The same pipeline on the same gathered data gives the values that were written.
        expected = pipeline.analyse(gather_patient(fhir, pacs, patient_id)).assessment
    assert written == {
        finding(f.finding).snomed: pytest.approx(f.probability, abs=1e-4) for f in expected.findings
    }
    assert set(expected.modalities_used) == {"image", "text", "labs"}


def test_same_analysis_twice_writes_one_report(
    call_hook: HookCaller, cohort: Path, fhir_url: str, dicomweb: Any
) -> None:
    patient_id = _load(cohort, fhir_url, dicomweb)[0]
    for _ in range(2):
        _ingest(call_hook, fhir_url, patient_id)
        assert call_hook(_request(fhir_url, patient_id)).status_code == 200
    with FhirClient(fhir_url) as fhir:
        reports = fhir.search("DiagnosticReport", {"subject": f"Patient/{patient_id}"})
    assert len(reports) == 1


def test_synthea_patient_with_study_but_no_pixels(
    call_hook: HookCaller,
    shared_data: Path,
    fhir_url: str,
    dicomweb: Any,
    tmp_path: Path,
) -> None:
    source = next((shared_data / "synthea-r4").glob("Louis_Erdman_*.json"))
    (tmp_path / source.name).write_bytes(source.read_bytes())
    (patient_id,) = _load(tmp_path, fhir_url, dicomweb)
    _ingest(call_hook, fhir_url, patient_id)

    response = call_hook(_request(fhir_url, patient_id))

    assert response.status_code == 200, response.text
    (card,) = response.json()["cards"]
    assert "no imaging available" in card["detail"]
    # the study's pixels are not in the PACS: said in one plain line (issue 21)
    assert "image not available from the PACS" in card["detail"]


def test_bad_requests_get_clear_errors(
    call_hook: HookCaller, fhir_url: str, ehr_key: ECKey
) -> None:
    missing = call_hook(_request(fhir_url, None))
    assert missing.status_code == 400
    assert "context.patientId" in missing.json()["error"]

    unknown = call_hook(_request(fhir_url, "x"), service="no-such-service")
    assert unknown.status_code == 404

    oversized = call_hook({**_request(fhir_url, "x"), "padding": "x" * 1_100_000})
    assert oversized.status_code == 413

    foreign = call_hook({**_request(fhir_url, "x"), "fhirServer": "http://169.254.169.254/fhir"})
    assert foreign.status_code == 403

    wrong_aud = sign_hook_jwt(ehr_key, issuer=ISSUER, audience=f"{BASE}/other", kid=KID)
    assert call_hook(_request(fhir_url, "x"), token=wrong_aud).status_code == 401
    anonymous = call_hook.client.post(
        "/cds-services/mmcds-patient-view", json=_request(fhir_url, "x")
    )
    assert anonymous.status_code == 401
    assert anonymous.json() == {}


def test_replayed_token_is_refused(call_hook: HookCaller, fhir_url: str, ehr_key: ECKey) -> None:
    token = sign_hook_jwt(ehr_key, issuer=ISSUER, audience=ENDPOINT, kid=KID)
    first = call_hook(_request(fhir_url, None), token=token)
    assert first.status_code == 400  # accepted, then refused for the missing patient
    assert call_hook(_request(fhir_url, None), token=token).status_code == 401


def test_fhir_server_down_gives_412_and_service_keeps_serving(
    call_hook: HookCaller, cohort: Path, fhir_url: str, dicomweb: Any
) -> None:
    # CDS Hooks 2.0: required data neither prefetched nor readable -> 412 + OperationOutcome
    down = call_hook(_request(call_hook.dead_fhir, "anyone"))
    assert down.status_code == 412
    assert down.json()["resourceType"] == "OperationOutcome"
    assert "unavailable" in down.json()["issue"][0]["diagnostics"]

    patient_id = _load(cohort, fhir_url, dicomweb)[0]
    assert call_hook(_request(fhir_url, patient_id)).status_code == 200


def test_discovery_lists_the_patient_view_service(call_hook: HookCaller) -> None:
    services = call_hook.client.get("/cds-services").json()["services"]
    assert {"id": "mmcds-patient-view", "hook": "patient-view"}.items() <= services[0].items()
    card = call_hook.client.get("/model-card")
    assert card.status_code == 200 and "Intended use" in card.text


def test_a_started_service_keeps_its_long_lived_objects_out_of_gc_scans(
    make_settings: Any, pipeline: Pipeline
) -> None:
    """A full garbage collection scanned every object alive (~600k after importing torch and
    transformers), stopping every hook for 225 ms on a quiet machine (the p99 of one-process
    runs of ``benchmarks/hook_load.py``). Started, the service has frozen them."""
    import gc

    from fastapi.testclient import TestClient

    from mmcds.service.api import create_app

    app = create_app(make_settings(["http://fhir.gc.test/fhir/R4"]), pipeline)
    gc.unfreeze()  # what earlier apps of this test session froze: scanned again from here
    gc.collect()
    alive = len(gc.get_objects())  # what a full collection scans
    try:
        with TestClient(app) as client:
            assert client.get("/cds-services").status_code == 200
            assert len(gc.get_objects()) < alive / 10
    finally:
        gc.unfreeze()
