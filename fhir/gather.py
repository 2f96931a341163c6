"""Gather: one patient's notes, labs and images from FHIR + DICOMweb into a ``PatientRecord``.

Whatever cannot be loaded (a server down, an undecodable image, a note over the size limit) is
recorded in ``PatientRecord.missing`` with the reason, so cards can say what was not seen.
Only a failure to read the Patient itself is fatal.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from datetime import date
from typing import Any, Protocol

from mmcds.encoders.dicom import ImageDecodeError, decode_bitmap, decode_dicom
from mmcds.encoders.labs import observations_to_frame
from mmcds.encoders.notes import (
    NoteError,
    note_from_document_reference,
    notes_from_diagnostic_report,
)
from mmcds.encoders.quality import check_quality
from mmcds.fhir.client import FhirError
from mmcds.fhir.dicomweb import DicomWebError, InstanceRef
from mmcds.fhir.report import REPORT_SYSTEM
from mmcds.records import ImageInput, Missing, Note, Patient, PatientRecord

log = logging.getLogger(__name__)

# Radiographs the image encoders are meant for; other modalities are reported, not encoded.
IMAGE_MODALITIES = {"CR", "DX", "DR"}
BITMAP_TYPES = ("image/png", "image/jpeg")
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"

# Every search gather makes, by name: (resource type, parameters besides ``patient`` and
# ``_count``). CDS Hooks prefetch templates are derived from these (``mmcds.fhir.prefetch``), so
# what the EHR prefetches is exactly what gather would have asked for.
QUERIES: dict[str, tuple[str, dict[str, str]]] = {
    "documents": ("DocumentReference", {"status": "current"}),
    "reports": ("DiagnosticReport", {}),
    "labs": ("Observation", {"category": "laboratory"}),
    "vitals": ("Observation", {"category": "vital-signs"}),
    "imaging": ("ImagingStudy", {}),
    "media": ("Media", {"status": "completed"}),
}
# Page sizes asked for (documents: the notes limit, ``Limits.max_notes``).
COUNTS = {"reports": 50, "labs": 200, "vitals": 200, "imaging": 50, "media": 50}


def _search(
    fhir: FhirReader, name: str, subject: str, count: int | None = None
) -> list[dict[str, Any]]:
    resource_type, params = QUERIES[name]
    size = count if count is not None else COUNTS[name]
    return fhir.search(resource_type, {"patient": subject, **params, "_count": str(size)})


def _ai_generated(resource: dict[str, Any]) -> bool:
    """Resources carrying the AIAST label were written by an AI (ours among them): reading them
    back as evidence would feed the model its own output."""
    labels = (resource.get("meta") or {}).get("security") or []
    ours = any(i.get("system") == REPORT_SYSTEM for i in resource.get("identifier") or [])
    return ours or any(tag.get("code") == "AIAST" for tag in labels)


class FhirReader(Protocol):
    """The reads gather needs: a ``FhirClient``, or ``BundleFhir`` over a bundle file."""

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]: ...

    def search(self, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]: ...

    def fetch_bytes(self, url: str) -> bytes: ...


class InstanceReader(Protocol):
    """WADO-RS retrieve: a ``DicomWebClient``, or ``LocalDicom`` over files on disk."""

    def retrieve(self, ref: InstanceRef) -> bytes: ...


@dataclass(frozen=True)
class Limits:
    max_notes: int = 50
    max_note_chars: int = 200_000
    max_images: int = 8
    max_image_pixels: int = 40_000_000
    max_labs: int = 5_000


def _study_uid(study: dict[str, Any]) -> str | None:
    for ident in study.get("identifier") or []:
        value = str(ident.get("value", ""))
        if ident.get("system") == "urn:dicom:uid" or value.startswith("urn:oid:"):
            return value.removeprefix("urn:oid:")
    return None


def _instances_of(study: dict[str, Any], study_uid: str) -> list[InstanceRef]:
    refs = []
    for series in study.get("series") or []:
        modality = (series.get("modality") or {}).get("code")
        if modality and modality not in IMAGE_MODALITIES:
            continue
        for inst in series.get("instance") or []:
            refs.append(InstanceRef(study_uid, series["uid"], inst["uid"]))
    return refs


def gather_patient(
    fhir: FhirReader,
    pacs: InstanceReader | None,
    patient_id: str,
    *,
    limits: Limits | None = None,
    encounter: str | None = None,
) -> PatientRecord:
    """Read everything the models need about one patient. Raises ``FhirError`` only if the
    Patient itself cannot be read."""
    limits = limits or Limits()
    resource = fhir.read("Patient", patient_id)
    birth = resource.get("birthDate")
    record = PatientRecord(
        patient=Patient(
            id=patient_id,
            sex=resource.get("gender"),
            birth_date=date.fromisoformat(birth[:10]) if birth and len(birth) >= 10 else None,
        ),
        encounter=encounter,
    )
    subject = f"Patient/{patient_id}"
    _gather_notes(fhir, subject, record, limits)
    _gather_labs(fhir, subject, record, limits)
    _gather_images(fhir, pacs, subject, record, limits)
    return record


def _gather_notes(fhir: FhirReader, subject: str, record: PatientRecord, limits: Limits) -> None:
    try:
        docs = _search(fhir, "documents", subject, limits.max_notes)
    except FhirError as exc:
        record.missing.append(Missing("text", f"notes unavailable: {exc}"))
        return
    notes: list[Note] = []
    for doc in docs[: limits.max_notes]:
        ref = f"DocumentReference/{doc.get('id')}"
        try:
            notes.append(
                note_from_document_reference(doc, fhir.fetch_bytes, max_chars=limits.max_note_chars)
            )
        except (NoteError, FhirError) as exc:
            record.missing.append(Missing("text", str(exc), ref))
    notes += _report_narratives(fhir, subject, record, limits.max_notes - len(notes), limits)
    if len(docs) > limits.max_notes:
        record.missing.append(
            Missing("text", f"only the first {limits.max_notes} notes were read (MMCDS_MAX_NOTES)")
        )
    record.notes = sorted(notes, key=lambda n: (n.date is None, n.date))


def _report_narratives(
    fhir: FhirReader, subject: str, record: PatientRecord, room: int, limits: Limits
) -> list[Note]:
    """Narratives of DiagnosticReports (prior radiology reports...) as notes, ours excluded."""
    if room <= 0:
        return []
    try:
        reports = _search(fhir, "reports", subject)
    except FhirError as exc:
        record.missing.append(Missing("text", f"reports unavailable: {exc}"))
        return []
    notes: list[Note] = []
    for report in reports:
        if _ai_generated(report) or report.get("status") == "entered-in-error":
            continue
        try:
            notes += notes_from_diagnostic_report(
                report, fhir.fetch_bytes, max_chars=limits.max_note_chars
            )
        except (NoteError, FhirError) as exc:
            record.missing.append(Missing("text", str(exc), f"DiagnosticReport/{report.get('id')}"))
    return notes[:room]


def _gather_labs(fhir: FhirReader, subject: str, record: PatientRecord, limits: Limits) -> None:
    observations: list[dict[str, Any]] = []
    for name in ("labs", "vitals"):
        try:
            observations += _search(fhir, name, subject)[: limits.max_labs]
        except FhirError as exc:
            category = QUERIES[name][1]["category"]
            record.missing.append(Missing("labs", f"{category} results unavailable: {exc}"))
    frame, missing = observations_to_frame(observations)
    record.labs = frame
    record.missing.extend(missing)


def _gather_images(
    fhir: FhirReader,
    pacs: InstanceReader | None,
    subject: str,
    record: PatientRecord,
    limits: Limits,
) -> None:
    try:
        studies = _search(fhir, "imaging", subject)
    except FhirError as exc:
        record.missing.append(Missing("image", f"imaging studies unavailable: {exc}"))
        return
    images: list[ImageInput] = []
    for study in studies:
        ref = f"ImagingStudy/{study.get('id')}"
        study_uid = _study_uid(study)
        if not study_uid:
            record.missing.append(Missing("image", "ImagingStudy has no DICOM study UID", ref))
            continue
        if pacs is None:
            record.missing.append(Missing("image", "no PACS configured (MMCDS_DICOMWEB_URL)", ref))
            continue
        for inst in _instances_of(study, study_uid):
            if len(images) >= limits.max_images:
                record.missing.append(
                    Missing("image", f"more than {limits.max_images} images; rest skipped", ref)
                )
                break
            image = _load_instance(pacs, inst, ref, record, limits)
            if image is not None:
                images.append(image)
    images += _media_images(fhir, subject, record, limits, limits.max_images - len(images))
    record.images = images


def _media_images(
    fhir: FhirReader, subject: str, record: PatientRecord, limits: Limits, room: int
) -> list[ImageInput]:
    """PNG/JPEG radiographs attached as FHIR Media (inline or via Binary), ours excluded."""
    if room <= 0:
        return []
    try:
        media = _search(fhir, "media", subject)
    except FhirError as exc:
        record.missing.append(Missing("image", f"media unavailable: {exc}"))
        return []
    images: list[ImageInput] = []
    for item in media:
        content = item.get("content") or {}
        kind = str(content.get("contentType", "")).split(";")[0].strip().lower()
        if _ai_generated(item) or kind not in BITMAP_TYPES:
            continue
        ref = f"Media/{item.get('id')}"
        if len(images) >= room:
            record.missing.append(Missing("image", f"more than {limits.max_images} images", ref))
            break
        modality = next(
            (
                c.get("code")
                for c in (item.get("modality") or {}).get("coding") or []
                if c.get("system") == DCM_SYSTEM
            ),
            None,
        )
        try:
            data = (
                base64.b64decode(content["data"])
                if content.get("data")
                else fhir.fetch_bytes(str(content.get("url", "")))
            )
            image = decode_bitmap(
                data,
                kind,
                reference=ref,
                max_pixels=limits.max_image_pixels,
                modality=modality,
                view=(item.get("view") or {}).get("text"),
                body_part=(item.get("bodySite") or {}).get("text"),
            )
        except (FhirError, ImageDecodeError, ValueError) as exc:
            record.missing.append(Missing("image", f"{ref} undecodable: {exc}", ref))
            continue
        if _rejected(image, ref, record):
            continue
        images.append(image)
    return images


def _rejected(image: ImageInput, ref: str, record: PatientRecord) -> bool:
    rejected = [q for q in check_quality(image) if q.severity == "reject"]
    if rejected:
        reasons = "; ".join(q.message for q in rejected)
        record.missing.append(Missing("image", f"image {image.sop_uid} rejected: {reasons}", ref))
    return bool(rejected)


def _load_instance(
    pacs: InstanceReader,
    inst: InstanceRef,
    ref: str,
    record: PatientRecord,
    limits: Limits,
) -> ImageInput | None:
    try:
        data = pacs.retrieve(inst)
        image = decode_dicom(data, reference=ref, max_pixels=limits.max_image_pixels)
    except DicomWebError as exc:
        # Typically a study the EHR knows of whose pixels never reached this PACS.
        record.missing.append(Missing("image", f"image {inst.sop_uid} unavailable: {exc}", ref))
        return None
    except ImageDecodeError as exc:
        record.missing.append(Missing("image", f"image {inst.sop_uid} undecodable: {exc}", ref))
        return None
    return None if _rejected(image, ref, record) else image
