"""Hooks with prefetch, end to end: the sandbox's request log shows which reads were made."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from mmcds.dev.servers import FhirSandbox
from mmcds.fhir.prefetch import prefetch_templates
from mmcds.service.conformance import problems_cards_response


def _prefetch(fhir_url: str, patient_id: str, keys: set[str] | None = None) -> dict[str, Any]:
    """What an EHR would send for ``keys`` (default: all), each template run on its server."""
    out = {}
    for key, template in prefetch_templates().items():
        if keys is None or key in keys:
            query = template.replace("{{context.patientId}}", patient_id)
            out[key] = httpx.get(f"{fhir_url}/{query}").raise_for_status().json()
    return out


def _hook(fhir_url: str, patient_id: str, prefetch: dict[str, Any]) -> dict[str, Any]:
    return {
        "hook": "patient-view",
        "hookInstance": "0b5d4c8e-8f0e-4a6f-9f54-4f1f5d7a7c11",
        "fhirServer": fhir_url,
        "fhirAuthorization": {"access_token": "ehr-token", "token_type": "Bearer"},
        "context": {"patientId": patient_id, "userId": "Practitioner/1"},
        "prefetch": prefetch,
    }


def _writeback(request: dict[str, Any]) -> bool:
    """The report write-back's own requests: the transaction, and its two searches before it
    (is this report already there; which earlier preliminary AI reports does it supersede)."""
    url = str(request["url"])
    return request["method"] == "POST" or (
        "/DiagnosticReport?" in url and ("identifier=" in url or "status=preliminary" in url)
    )


def _reads(sandbox: FhirSandbox) -> list[str]:
    """Paths (with query) of the GETs the service made: reads, not the report write-back."""
    return [str(r["url"]) for r in sandbox.requests() if not _writeback(r)]


def test_full_prefetch_makes_no_fhir_read(
    call_hook: Any,
    load_cohort: Callable[[Path | None], list[str]],
    fhir_url: str,
    fhir_sandbox: FhirSandbox,
) -> None:
    patient_id = load_cohort(None)[0]
    prefetch = _prefetch(fhir_url, patient_id)
    fhir_sandbox.reset_log()

    response = call_hook(_hook(fhir_url, patient_id, prefetch))

    assert response.status_code == 200, response.text
    assert problems_cards_response(response.json()) == []
    (card,) = response.json()["cards"]
    assert "Not available to the model" not in card["detail"]  # image, notes and labs all used
    assert _reads(fhir_sandbox) == []
    # the report is still written back (a POST transaction), with no token of the EHR's
    assert [r["method"] for r in fhir_sandbox.requests() if r["method"] != "GET"] == ["POST"]


def test_partial_prefetch_fetches_only_what_is_missing_with_the_token(
    call_hook: Any,
    load_cohort: Callable[[Path | None], list[str]],
    fhir_url: str,
    fhir_sandbox: FhirSandbox,
) -> None:
    patient_id = load_cohort(None)[0]
    prefetch = _prefetch(fhir_url, patient_id, {"patient", "labs"})
    prefetch["vitals"] = None  # "ask the server"
    prefetch["documents"] = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "timeout", "diagnostics": "EHR prefetch failed"}],
    }
    fhir_sandbox.reset_log()

    response = call_hook(_hook(fhir_url, patient_id, prefetch))

    assert response.status_code == 200, response.text
    reads = _reads(fhir_sandbox)
    kinds = sorted(url.split("?")[0].rsplit("/", 1)[-1] for url in reads)
    assert kinds == [
        "DiagnosticReport",
        "DocumentReference",
        "ImagingStudy",
        "Media",
        "Observation",
    ]
    assert any("category=vital-signs" in url for url in reads)
    assert not any("category=laboratory" in url for url in reads)  # prefetched
    assert all(r["bearer"] for r in fhir_sandbox.requests() if not _writeback(r))
    (card,) = response.json()["cards"]
    assert "Not available to the model" not in card["detail"]


def test_unreachable_server_without_the_patient_prefetched_is_412(
    call_hook: Any, load_cohort: Callable[[Path | None], list[str]], fhir_url: str
) -> None:
    patient_id = load_cohort(None)[0]
    prefetch = _prefetch(fhir_url, patient_id, {"labs", "vitals"})

    response = call_hook(_hook(call_hook.dead_fhir, patient_id, prefetch))

    assert response.status_code == 412
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "Patient" in outcome["issue"][0]["diagnostics"]


def test_unreachable_server_with_the_patient_prefetched_degrades(
    call_hook: Any, load_cohort: Callable[[Path | None], list[str]], fhir_url: str
) -> None:
    patient_id = load_cohort(None)[0]
    prefetch = _prefetch(fhir_url, patient_id, {"patient", "labs", "vitals"})

    response = call_hook(_hook(call_hook.dead_fhir, patient_id, prefetch))

    assert response.status_code == 200, response.text
    (card,) = response.json()["cards"]
    assert "Not available to the model" in card["detail"]  # notes and images could not be read
