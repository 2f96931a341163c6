"""The real test servers behave like the real servers they stand for (DESIGN.md §4)."""

from __future__ import annotations

import base64
import io
import json
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from mmcds.dev.servers import OrthancPacs

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


def _patient(family: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family}], **extra}


def _observation(subject: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
        "subject": {"reference": subject},
        "valueQuantity": {"value": 38.2, "unit": "Cel", "system": "http://unitsofmeasure.org"},
    }


def _post(url: str, body: Any) -> httpx.Response:
    return httpx.post(url, json=body, headers=FHIR_JSON, timeout=60)


def _transaction(*entries: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def _create(
    resource: dict[str, Any], full_url: str | None = None, **request: str
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], **request},
    }
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def _search(url: str, **params: str) -> dict[str, Any]:
    response = httpx.get(url, params=params, headers=FHIR_JSON)
    assert response.status_code == 200, response.text
    return response.json()


def test_metadata_is_an_r4_capability_statement(fhir_url: str) -> None:
    statement = httpx.get(f"{fhir_url}/metadata").json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    types = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert {"Patient", "Observation", "DiagnosticReport", "ImagingStudy"} <= types.keys()
    assert "patient" in {p["name"] for p in types["Observation"]["searchParam"]}


def test_invalid_resources_are_rejected_on_create_and_update(fhir_url: str) -> None:
    bad = _post(f"{fhir_url}/Patient", _patient("Doe", birthDate="31/12/1970"))
    assert bad.status_code == 400
    assert bad.json()["issue"][0]["expression"] == ["Patient.birthDate"]

    created = _post(f"{fhir_url}/Patient", _patient("Doe")).json()
    update = httpx.put(
        f"{fhir_url}/Patient/{created['id']}",
        json={**created, "gender": "not-a-gender", "colour": "blue"},
        headers=FHIR_JSON,
    )
    assert update.status_code == 400
    assert update.json()["resourceType"] == "OperationOutcome"
    assert httpx.get(f"{fhir_url}/Patient/{created['id']}").json()["meta"] == created["meta"]


def test_failing_transaction_changes_nothing_and_names_the_entry(fhir_url: str) -> None:
    existing = _post(f"{fhir_url}/Patient", _patient("Before")).json()
    renamed = {**existing, "name": [{"family": "After"}]}
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    bundle = _transaction(
        {"resource": renamed, "request": {"method": "PUT", "url": f"Patient/{existing['id']}"}},
        _create(_patient("New"), patient_urn),
        _create(_observation(patient_urn)),
        _create({"resourceType": "Observation", "status": "final"}),  # no code: invalid
    )
    response = _post(fhir_url, bundle)
    assert response.status_code == 400
    issue = response.json()["issue"][0]
    assert "Bundle.entry[3]" in issue["expression"]
    assert "Bundle.entry[3]" in issue["diagnostics"]
    assert "Observation.code" in issue["diagnostics"]

    # Everything is as before: the update undone (no extra version), the creates gone.
    assert httpx.get(f"{fhir_url}/Patient/{existing['id']}").json() == existing
    history = httpx.get(f"{fhir_url}/Patient/{existing['id']}/_history").json()
    assert len(history["entry"]) == 1
    assert _search(f"{fhir_url}/Patient")["total"] == 1
    assert _search(f"{fhir_url}/Observation")["total"] == 0


def test_transaction_resolves_urn_conditional_references_and_if_none_exist(fhir_url: str) -> None:
    mrn = {"system": "urn:oid:1.2.3.4", "value": f"mrn-{uuid.uuid4()}"}
    bundle = _transaction(
        _create(
            _patient("Conditional", identifier=[mrn]),
            f"urn:uuid:{uuid.uuid4()}",
            ifNoneExist=f"identifier={mrn['system']}|{mrn['value']}",
        ),
        _create(_observation(f"Patient?identifier={mrn['system']}|{mrn['value']}")),
    )
    first = _post(fhir_url, bundle)
    assert first.status_code == 200, first.text
    statuses = [e["response"]["status"] for e in first.json()["entry"]]
    assert statuses == ["201 Created", "201 Created"]
    patient_id = first.json()["entry"][0]["resource"]["id"]
    assert first.json()["entry"][1]["resource"]["subject"] == {"reference": f"Patient/{patient_id}"}

    second = _post(fhir_url, bundle).json()  # the patient exists now: no duplicate
    assert second["entry"][0]["response"]["status"].startswith("200")
    assert second["entry"][0]["resource"]["id"] == patient_id
    assert _search(f"{fhir_url}/Patient")["total"] == 1
    assert _search(f"{fhir_url}/Observation", patient=patient_id)["total"] == 2


def test_batch_answers_each_entry_on_its_own(fhir_url: str) -> None:
    bundle = _transaction(
        _create(_patient("Good")),
        _create(_patient("Bad", birthDate="yesterday")),
        kind="batch",
    )
    response = _post(fhir_url, bundle).json()
    assert response["type"] == "batch-response"
    assert [e["response"]["status"][:3] for e in response["entry"]] == ["201", "400"]
    assert _search(f"{fhir_url}/Patient")["total"] == 1


def test_search_pages_with_total_and_links(fhir_url: str) -> None:
    _post(fhir_url, _transaction(*(_create(_patient(f"P{i}")) for i in range(5))))
    page = _search(f"{fhir_url}/Patient", _count="2")
    assert page["total"] == 5
    seen: list[str] = []
    pages = 0
    while True:
        pages += 1
        seen += [e["resource"]["id"] for e in page["entry"]]
        links = {link["relation"]: link["url"] for link in page["link"]}
        assert "self" in links
        assert ("previous" in links) == (pages > 1)
        if "next" not in links:
            break
        page = httpx.get(links["next"]).json()
    assert pages == 3
    assert len(set(seen)) == 5

    counted = _search(f"{fhir_url}/Patient", _summary="count")
    assert counted["total"] == 5 and "entry" not in counted
    subset = _search(f"{fhir_url}/Patient", _elements="name", _count="1")["entry"][0]["resource"]
    assert subset.keys() == {"resourceType", "id", "meta", "name"}


def test_bare_patient_id_means_that_patient(fhir_url: str) -> None:
    patient = _post(f"{fhir_url}/Patient", _patient("Bare")).json()
    other = _post(f"{fhir_url}/Patient", _patient("Other")).json()
    _post(f"{fhir_url}/Observation", _observation(f"Patient/{patient['id']}"))
    _post(f"{fhir_url}/Observation", _observation(f"Patient/{other['id']}"))
    for param in ("patient", "subject"):
        found = _search(f"{fhir_url}/Observation", **{param: patient["id"]})
        assert found["total"] == 1, param
        assert found["entry"][0]["resource"]["subject"]["reference"] == f"Patient/{patient['id']}"


def test_unknown_or_unsupported_search_parameters_are_400(fhir_url: str) -> None:
    for params in (
        {"pateint": "123"},
        {"value-quantity": "38"},
        {"_include": "Observation:subject"},
    ):
        response = httpx.get(f"{fhir_url}/Observation", params=params)
        assert response.status_code == 400, params
        assert response.json()["resourceType"] == "OperationOutcome"
    ok = {"_count": "1", "_offset": "0", "_sort": "-date", "_summary": "true", "_total": "accurate"}
    assert httpx.get(f"{fhir_url}/Observation", params=ok).status_code == 200


def test_reset_deletes_everything(fhir_sandbox: Any, fhir_url: str) -> None:
    _post(f"{fhir_url}/Patient", _patient("Gone"))
    assert _search(f"{fhir_url}/Patient")["total"] == 1
    fhir_sandbox.reset()
    assert _search(f"{fhir_url}/Patient")["total"] == 0


def test_bad_bodies_get_400_and_the_server_lives_on(fhir_url: str) -> None:
    broken = httpx.post(f"{fhir_url}/Patient", content=b'{"resourceType": ', headers=FHIR_JSON)
    assert broken.status_code == 400
    assert "not valid JSON" in broken.json()["issue"][0]["details"]["text"]
    wrong_type = _post(f"{fhir_url}/Patient", {"resourceType": "Observation", "status": "final"})
    assert wrong_type.status_code == 400
    assert _post(fhir_url, {"resourceType": "Bundle", "type": "collection"}).status_code == 400
    too_big = b'{"resourceType": "Patient", "x": "' + b"a" * (33 * 1024 * 1024) + b'"}'
    assert httpx.post(fhir_url, content=too_big, headers=FHIR_JSON).status_code == 413
    assert httpx.get(f"{fhir_url}/metadata").status_code == 200


def test_binary_reads_as_json_or_raw_bytes(fhir_url: str) -> None:
    data = b"%PDF-1.4 not really"
    binary = {
        "resourceType": "Binary",
        "contentType": "application/pdf",
        "data": base64.b64encode(data).decode(),
    }
    created = _post(f"{fhir_url}/Binary", binary).json()
    as_json = httpx.get(f"{fhir_url}/Binary/{created['id']}", headers=FHIR_JSON)
    assert as_json.json()["data"] == binary["data"]
    raw = httpx.get(f"{fhir_url}/Binary/{created['id']}", headers={"Accept": "*/*"})
    assert raw.headers["content-type"] == "application/pdf"
    assert raw.content == data


@pytest.mark.slow
def test_synthea_bundles_load_as_transactions(fhir_url: str, shared_data: Path) -> None:
    files = sorted((shared_data / "synthea-r4").glob("*.json"))
    assert len(files) == 10
    for path in files:
        bundle = json.loads(path.read_text())
        response = httpx.post(
            fhir_url,
            content=path.read_bytes(),
            headers={**FHIR_JSON, "Prefer": "return=minimal"},
            timeout=120,
        )
        assert response.status_code == 200, f"{path.name}: {response.text[:500]}"
        entries = response.json()["entry"]
        assert len(entries) == len(bundle["entry"])
        assert all(e["response"]["status"] == "201 Created" for e in entries)
        assert not any("resource" in e for e in entries)  # Prefer: return=minimal

        patient = next(e["resource"] for e in bundle["entry"] if e["request"]["url"] == "Patient")
        mrn = patient["identifier"][0]
        found = _search(f"{fhir_url}/Patient", identifier=f"{mrn['system']}|{mrn['value']}")
        assert found["total"] == 1, path.name
        own_observations = sum(e["request"]["url"] == "Observation" for e in bundle["entry"])
        observations = _search(
            f"{fhir_url}/Observation", patient=found["entry"][0]["resource"]["id"], _count="0"
        )
        assert observations["total"] == own_observations, path.name
    assert _search(f"{fhir_url}/Patient")["total"] == 10


def _multipart(parts: list[bytes], content_type: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    )
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="{content_type}"; boundary={boundary}'


def test_orthanc_stores_via_stow_and_returns_via_wado(
    dicomweb: OrthancPacs, shared_data: Path
) -> None:
    path = shared_data / "dicom" / "ct-small.dcm"
    source = pydicom.dcmread(path)
    body, content_type = _multipart([path.read_bytes()], "application/dicom")
    with httpx.Client(auth=dicomweb.auth, timeout=30) as client:
        stored = client.post(
            f"{dicomweb.dicomweb_url}/studies",
            content=body,
            headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
        )
        assert stored.status_code == 200, stored.text
        assert "00081199" in stored.json()  # ReferencedSOPSequence: stored, not failed

        url = (
            f"{dicomweb.dicomweb_url}/studies/{source.StudyInstanceUID}"
            f"/series/{source.SeriesInstanceUID}/instances/{source.SOPInstanceUID}"
        )
        fetched = client.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
        assert fetched.status_code == 200
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {fetched.headers['content-type']}\r\n\r\n".encode() + fetched.content
    )
    parts = [p.get_payload(decode=True) for p in message.iter_parts()]
    assert len(parts) == 1 and isinstance(parts[0], bytes)
    returned = pydicom.dcmread(io.BytesIO(parts[0]))
    assert returned.SOPInstanceUID == source.SOPInstanceUID
    assert returned.pixel_array.tobytes() == source.pixel_array.tobytes()
