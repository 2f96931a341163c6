"""Gather from the real FHIR sandbox: the second sources (report narratives, Media images) and
the rule that the service never reads its own AI output back as evidence."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from mmcds.fhir.client import FhirClient
from mmcds.fhir.gather import gather_patient

AIAST = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST"}
RADIOLOGY_TEXT = "FINDINGS: Right lower lobe consolidation.\nIMPRESSION: Pneumonia likely."


def _png() -> bytes:
    # A chest-film-like gradient: not blank, not saturated, big enough for the quality gate.
    y, x = np.mgrid[0:256, 0:256]
    pixels = (40 + 150 * np.exp(-(((x - 128) / 60.0) ** 2)) + 0.2 * y).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _report(patient: str, text: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"text": "Chest X-ray report"},
        "subject": {"reference": patient},
        "presentedForm": [{"contentType": "text/plain; charset=utf-8", "data": _b64(text)}],
        **extra,
    }


def _media(patient: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Media",
        "status": "completed",
        "subject": {"reference": patient},
        "content": {"contentType": "image/png", "data": _b64(_png())},
        **extra,
    }


def test_report_narratives_and_media_images_are_read_but_not_our_own_output(
    fhir_url: str,
) -> None:
    with FhirClient(fhir_url) as fhir:
        patient = fhir.create({"resourceType": "Patient", "gender": "female"})
        subject = f"Patient/{patient['id']}"
        radiology = fhir.create(_report(subject, RADIOLOGY_TEXT))
        fhir.create(_report(subject, "AI says pneumonia", meta={"security": [AIAST]}))
        media = fhir.create(_media(subject))
        fhir.create(_media(subject, meta={"security": [AIAST]}))  # a saliency overlay of ours

        record = gather_patient(fhir, None, patient["id"])

    assert [n.reference for n in record.notes] == [f"DiagnosticReport/{radiology['id']}"]
    assert record.notes[0].text == RADIOLOGY_TEXT
    assert [img.reference for img in record.images] == [f"Media/{media['id']}"]
    assert record.images[0].pixels.shape == (256, 256)
    assert record.missing == []
