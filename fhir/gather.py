"""Gather: one patient's notes, labs and images from FHIR + DICOMweb into a ``PatientRecord``.

Whatever cannot be loaded (a server down, an undecodable image, a note over the size limit) is
recorded in ``PatientRecord.missing`` with the reason, so cards can say what was not seen.
Only a failure to read the Patient itself is fatal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date
from typing import Any

from mmcds.encoders.dicom import ImageDecodeError, decode_dicom
from mmcds.encoders.labs import observations_to_frame
from mmcds.encoders.notes import NoteError, note_from_document_reference
from mmcds.encoders.quality import check_quality
from mmcds.fhir.client import FhirClient, FhirError
from mmcds.fhir.dicomweb import DicomWebClient, DicomWebError, InstanceRef
from mmcds.records import ImageInput, Missing, Note, Patient, PatientRecord

log = logging.getLogger(__name__)

# Radiographs the image encoders are meant for; other modalities are reported, not encoded.
IMAGE_MODALITIES = {"CR", "DX", "DR"}


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
    fhir: FhirClient,
    pacs: DicomWebClient | None,
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


def _gather_notes(fhir: FhirClient, subject: str, record: PatientRecord, limits: Limits) -> None:
    try:
        docs = fhir.search(
            "DocumentReference",
            {"patient": subject, "status": "current", "_count": str(limits.max_notes)},
        )
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
    if len(docs) > limits.max_notes:
        record.missing.append(
            Missing("text", f"only the first {limits.max_notes} notes were read (MMCDS_MAX_NOTES)")
        )
    record.notes = sorted(notes, key=lambda n: (n.date is None, n.date))


def _gather_labs(fhir: FhirClient, subject: str, record: PatientRecord, limits: Limits) -> None:
    observations: list[dict[str, Any]] = []
    for category in ("laboratory", "vital-signs"):
        try:
            observations += fhir.search(
                "Observation",
                {"patient": subject, "category": category, "_count": "200"},
            )[: limits.max_labs]
        except FhirError as exc:
            record.missing.append(Missing("labs", f"{category} results unavailable: {exc}"))
    frame, missing = observations_to_frame(observations)
    record.labs = frame
    record.missing.extend(missing)


def _gather_images(
    fhir: FhirClient,
    pacs: DicomWebClient | None,
    subject: str,
    record: PatientRecord,
    limits: Limits,
) -> None:
    try:
        studies = fhir.search("ImagingStudy", {"patient": subject, "_count": "50"})
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
    record.images = images


def _load_instance(
    pacs: DicomWebClient,
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
    rejected = [q for q in check_quality(image) if q.severity == "reject"]
    if rejected:
        reasons = "; ".join(q.message for q in rejected)
        record.missing.append(Missing("image", f"image {inst.sop_uid} rejected: {reasons}", ref))
        return None
    return image
