"""Prefetch read key by key against the real FHIR sandbox: what was sent is used, the rest is
asked of the server, and the record gathered is the one gathering from the server gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from mmcds.dev.servers import FhirSandbox
from mmcds.fhir.client import FhirClient, FhirError
from mmcds.fhir.dicomweb import DicomWebClient
from mmcds.fhir.gather import QUERIES, gather_patient
from mmcds.fhir.load import load_folder
from mmcds.fhir.prefetch import PrefetchedFhir, prefetch_templates
from mmcds.synth import generate_cohort


@pytest.fixture(scope="module")
def cohort_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, patients=2, seed=5)
    return out


@pytest.fixture
def patient(cohort_folder: Path, fhir_url: str, dicomweb: Any) -> str:
    with (
        FhirClient(fhir_url, timeout=120) as fhir,
        DicomWebClient(dicomweb.dicomweb_url, auth=dicomweb.auth) as pacs,
    ):
        assert not load_folder(cohort_folder, fhir, pacs).errors
        return str(fhir.search("Patient", {"_count": "1"})[0]["id"])


def ehr_prefetch(fhir_url: str, patient_id: str, **count: int) -> dict[str, Any]:
    """What an EHR sends: each template filled in and run on its FHIR server (``count``
    overrides a key's page size, to make the server page)."""
    out = {}
    for key, template in prefetch_templates().items():
        query = template.replace("{{context.patientId}}", patient_id)
        if key in count:
            query = query.replace("_count=", f"_count={count[key]}&_x=").split("&_x=")[0]
        out[key] = httpx.get(f"{fhir_url}/{query}").raise_for_status().json()
    return out


def test_templates_are_gathers_own_searches() -> None:
    templates = prefetch_templates()
    assert templates["patient"] == "Patient/{{context.patientId}}"
    assert set(templates) == {"patient", *QUERIES}
    assert templates["labs"].startswith("Observation?patient={{context.patientId}}&")
    assert "category=laboratory" in templates["labs"]


def test_full_prefetch_gathers_the_same_record_without_a_read(
    patient: str, fhir_url: str, dicomweb: Any, fhir_sandbox: FhirSandbox
) -> None:
    prefetch = ehr_prefetch(fhir_url, patient)
    with (
        FhirClient(fhir_url) as fhir,
        DicomWebClient(dicomweb.dicomweb_url, auth=dicomweb.auth) as pacs,
    ):
        direct = gather_patient(fhir, pacs, patient)
        fhir_sandbox.reset_log()
        reader = PrefetchedFhir(prefetch, patient, fhir)
        prefetched = gather_patient(reader, pacs, patient)
    assert fhir_sandbox.requests() == []
    assert set(reader.states.values()) == {"used"}
    assert [n.text for n in prefetched.notes] == [n.text for n in direct.notes]
    assert prefetched.labs.equals(direct.labs)
    assert [i.sop_uid for i in prefetched.images] == [i.sop_uid for i in direct.images]
    assert len(direct.labs) > 0 and direct.notes and direct.images


def test_a_paged_prefetch_follows_next_on_the_server(
    patient: str, fhir_url: str, fhir_sandbox: FhirSandbox
) -> None:
    prefetch = ehr_prefetch(fhir_url, patient, labs=2)
    first_page = prefetch["labs"]
    assert any(link["relation"] == "next" for link in first_page["link"])
    params = {"patient": f"Patient/{patient}", **QUERIES["labs"][1], "_count": "200"}
    with FhirClient(fhir_url) as fhir:
        everything = fhir.search("Observation", params)
        fhir_sandbox.reset_log()
        got = PrefetchedFhir(prefetch, patient, fhir).search("Observation", params)
    assert [r["id"] for r in got] == [r["id"] for r in everything]
    assert len(everything) > 2
    asked = fhir_sandbox.requests()
    assert asked and all("Observation" in r["url"] for r in asked)  # only the next pages


def test_null_and_operation_outcome_keys_are_asked_of_the_server(
    patient: str, fhir_url: str, fhir_sandbox: FhirSandbox
) -> None:
    prefetch = ehr_prefetch(fhir_url, patient)
    prefetch["labs"] = None
    prefetch["imaging"] = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "timeout"}],
    }
    del prefetch["media"]
    with FhirClient(fhir_url) as fhir:
        fhir_sandbox.reset_log()
        reader = PrefetchedFhir(prefetch, patient, fhir)
        gather_patient(reader, None, patient)
    assert reader.states["labs"] == "ask" and reader.states["imaging"] == "failed"
    asked = sorted(str(r["url"]).split("?")[0].rsplit("/", 1)[-1] for r in fhir_sandbox.requests())
    assert asked == ["ImagingStudy", "Media", "Observation"]
    assert "category=laboratory" in next(
        str(r["url"]) for r in fhir_sandbox.requests() if "Observation" in str(r["url"])
    )


def test_another_patients_data_is_never_used(patient: str, fhir_url: str) -> None:
    prefetch = ehr_prefetch(fhir_url, patient)
    prefetch["patient"] = {**prefetch["patient"], "id": "someone-else"}
    stranger = {"resourceType": "Observation", "subject": {"reference": "Patient/someone-else"}}
    prefetch["vitals"]["entry"].append({"resource": stranger})
    params = {"patient": f"Patient/{patient}", **QUERIES["vitals"][1]}
    with FhirClient(fhir_url) as fhir:
        reader = PrefetchedFhir(prefetch, patient, fhir)
        assert reader.read("Patient", patient)["id"] == patient  # read from the server
        assert reader.states["patient"] == "malformed"
        assert stranger not in reader.search("Observation", params)


def test_a_next_link_to_another_host_is_refused(patient: str, fhir_url: str) -> None:
    prefetch = ehr_prefetch(fhir_url, patient)
    prefetch["labs"]["link"] = [{"relation": "next", "url": "http://169.254.169.254/Observation"}]
    params = {"patient": f"Patient/{patient}", **QUERIES["labs"][1]}
    with FhirClient(fhir_url, token="ehr-token") as fhir, pytest.raises(FhirError, match="outside"):
        PrefetchedFhir(prefetch, patient, fhir).search("Observation", params)
