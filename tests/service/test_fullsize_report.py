"""A full-size radiograph (3,000 x 2,500 px, as real CR/DX images are) writes back: the report is
read back from the real sandbox along DiagnosticReport -> Observations -> Media -> Binary ->
Device -> Provenance, each valid R4."""

from __future__ import annotations

import io
from typing import Any

import pytest
from fhir.resources.R4B.binary import Binary
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.media import Media
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.provenance import Provenance
from PIL import Image

from mmcds.dev.fullsize import enlarge_images, load_cohort, local_settings
from mmcds.dev.servers import FhirSandbox, OrthancPacs
from mmcds.fhir.bundle_limits import OMITTED_PREFIX, BundleLimits, oversize
from mmcds.fhir.client import FhirClient
from mmcds.fhir.report import report_bundle
from mmcds.fhir.writeback import send_bundle
from mmcds.findings import SYNTH_FINDINGS as FINDINGS
from mmcds.fusion.pipeline import Pipeline
from mmcds.service.analysis import AnalysisResult, AnalysisService, Trigger
from mmcds.settings import Settings
from mmcds.synth import generate_cohort

ROWS, COLS = 3000, 2500


@pytest.fixture(scope="module")
def full_size_patient(
    tmp_path_factory: pytest.TempPathFactory, fhir_sandbox: FhirSandbox, orthanc: OrthancPacs
) -> tuple[str, Settings]:
    root = tmp_path_factory.mktemp("fullsize")
    generate_cohort(root / "cohort", patients=1, seed=3)
    assert enlarge_images(root / "cohort", ROWS, COLS) == 1
    fhir_sandbox.reset()
    orthanc.reset()
    (patient_id,) = load_cohort(root / "cohort", fhir_sandbox.base_url, orthanc)
    models = tmp_path_factory.getbasetemp() / "models"
    return patient_id, local_settings(root, fhir_sandbox.base_url, orthanc, models)


def _read(fhir: FhirClient, reference: str) -> dict[str, Any]:
    return fhir.read(*reference.split("/")[:2])


@pytest.fixture(scope="module")
def result(full_size_patient: tuple[str, Settings], fhir_sandbox: FhirSandbox) -> AnalysisResult:
    patient_id, settings = full_size_patient
    service = AnalysisService(settings, pipeline=Pipeline.from_settings(settings))
    return service.analyse(Trigger(patient_id, fhir_sandbox.base_url))


def test_full_size_radiograph_writes_back_a_complete_valid_report(
    result: AnalysisResult, fhir_sandbox: FhirSandbox
) -> None:
    assert result.record is not None and result.record.images[0].pixels.shape == (ROWS, COLS)
    assert result.delivery is not None and result.delivery.status == "delivered"
    assert result.bundle is not None and oversize(result.bundle, BundleLimits()) is None
    assert f"DiagnosticReport/{result.delivery.report_id}" in result.cards[0]["detail"]

    with FhirClient(fhir_sandbox.base_url) as fhir:
        report = fhir.read("DiagnosticReport", result.delivery.report_id or "")
        DiagnosticReport.model_validate(report)
        assert report["status"] == "preliminary" and OMITTED_PREFIX not in report["conclusion"]
        observations = [_read(fhir, r["reference"]) for r in report["result"]]
        assert len(observations) == len(FINDINGS)
        devices = set()
        for obs in observations:
            Observation.model_validate(obs)
            devices.add(obs["device"]["reference"])
        (device_ref,) = devices
        Device.model_validate(_read(fhir, device_ref))
        assert len(report["media"]) == len(FINDINGS)
        for link in report["media"]:
            media = _read(fhir, link["link"]["reference"])
            Media.model_validate(media)
            assert "data" not in media["content"]
            binary = fhir._request(
                "GET", media["content"]["url"], headers={"Accept": "application/fhir+json"}
            ).json()
            Binary.model_validate(binary)
            png = fhir.fetch_bytes(media["content"]["url"])
            assert len(png) == media["content"]["size"]
            with Image.open(io.BytesIO(png)) as im:
                assert im.format == "PNG" and max(im.size) <= 1024 + 56  # + the legend strip
        (provenance,) = fhir.search("Provenance", {"target": f"DiagnosticReport/{report['id']}"})
        Provenance.model_validate(provenance)
        assert provenance["agent"][0]["who"]["reference"] == device_ref
        sources = {e["what"]["reference"] for e in provenance["entity"]}
        assert sources == {d["reference"] for d in observations[0]["derivedFrom"]}


def test_full_size_report_degrades_rather_than_fails_under_tight_limits(
    result: AnalysisResult,
) -> None:
    """A server that takes 100 kB strings: the overlays go, the report still lands."""
    assert result.analysis is not None and result.explanation is not None
    tight = BundleLimits(max_string_bytes=100_000)
    bundle = report_bundle(result.analysis, result.explanation, limits=tight)
    kinds = {e["resource"]["resourceType"] for e in bundle["entry"]}
    assert not kinds & {"Media", "Binary"} and oversize(bundle, tight) is None
    with FhirSandbox() as other:
        sent = send_bundle(other.base_url, bundle)
        with FhirClient(other.base_url) as fhir:
            report = fhir.read("DiagnosticReport", sent.report_id or "")
    assert OMITTED_PREFIX in report["conclusion"]
