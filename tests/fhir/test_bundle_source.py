"""One record builder: a patient's bundle read from disk (training) and the same bundle loaded
into the real sandbox + Orthanc and gathered (service) give equal records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mmcds.dev.servers import FhirSandbox, OrthancPacs
from mmcds.fhir.bundle_source import BundleFhir, LocalDicom
from mmcds.fhir.client import FhirClient, FhirError
from mmcds.fhir.dicomweb import DicomWebClient, InstanceRef
from mmcds.fhir.gather import gather_patient
from mmcds.fhir.load import load_folder
from mmcds.records import PatientRecord
from mmcds.synth import generate_cohort
from mmcds.training.dataset import PATIENT_SYSTEM, iter_examples


def _content(record: PatientRecord) -> dict[str, Any]:
    """What the models see, without the server-assigned ids (which differ by nature)."""
    labs = record.labs.drop(columns=["reference"]).reset_index(drop=True)
    return {
        "patient": (record.patient.sex, record.patient.birth_date),
        "notes": [(n.content_hash, n.note_type, n.date) for n in record.notes],
        "labs": labs.to_dict("records"),
        "images": [
            (i.content_hash, i.sop_uid, i.modality, i.view, i.site, i.acquired, i.pixels.shape)
            for i in record.images
        ],
        "missing": sorted((m.modality, m.reason.split(":")[0]) for m in record.missing),
    }


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, patients=3, seed=5)
    return out


def test_bundle_on_disk_and_gathered_from_servers_give_equal_records(
    cohort: Path, fhir_url: str, dicomweb: OrthancPacs, fhir_sandbox: FhirSandbox
) -> None:
    examples = list(iter_examples(cohort))
    assert examples and all(ex.record.images and ex.record.notes for ex in examples)
    with (
        FhirClient(fhir_url) as fhir,
        DicomWebClient(dicomweb.dicomweb_url, auth=dicomweb.auth) as pacs,
    ):
        assert not load_folder(cohort, fhir, pacs).errors
        for ex in examples:
            (patient,) = fhir.search("Patient", {"identifier": f"{PATIENT_SYSTEM}|{ex.key}"})
            served = gather_patient(fhir, pacs, patient["id"])
            on_disk = _content(ex.record)
            from_servers = _content(served)
            pd.testing.assert_frame_equal(
                pd.DataFrame(on_disk.pop("labs")), pd.DataFrame(from_servers.pop("labs"))
            )
            assert on_disk == from_servers


def test_bundle_source_answers_reads_like_a_server(cohort: Path) -> None:
    bundle = json.loads(next((cohort / "bundles").glob("*.json")).read_text())
    source = BundleFhir(bundle)
    assert source.read("Patient", "any-key") is source.patient
    observations = source.search("Observation", {"patient": "Patient/x", "category": "laboratory"})
    assert observations and all(o["id"] for o in observations)
    assert source.search("Observation", {"category": "no-such-category"}) == []
    with pytest.raises(FhirError):
        source.fetch_bytes("Binary/absent")
    with pytest.raises(FhirError, match="exactly one Patient"):
        BundleFhir({"resourceType": "Bundle", "entry": []})


def test_local_dicom_names_the_missing_instance(cohort: Path) -> None:
    dicom = LocalDicom.from_folder(cohort)
    assert dicom.index
    with pytest.raises(Exception, match="no DICOM file for instance 1.2.3"):
        dicom.retrieve(InstanceRef("1", "2", "1.2.3"))
