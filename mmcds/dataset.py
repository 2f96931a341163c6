"""A folder of FHIR bundles + DICOM files + a labels file, read as training examples.

Training reads the same resources the hook reads from the servers, through the same decoders
(notes, labs, DICOM), so the model sees at training time exactly what it sees in service. The
labels come from a separate file and never from inside the FHIR data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom

from mmcds.encoders.dicom import ImageDecodeError, decode_dicom
from mmcds.encoders.labs import observations_to_frame
from mmcds.encoders.notes import NoteError, note_from_document_reference
from mmcds.findings import FINDING_NAMES
from mmcds.records import ImageInput, Missing, Note, Patient, PatientRecord

PATIENT_SYSTEM = "urn:mmcds:synth:patient"


@dataclass
class Example:
    key: str
    record: PatientRecord
    labels: dict[str, int]
    site: str | None = None
    sex: str | None = None
    age_band: str | None = None
    masks: dict[str, Path] = field(default_factory=dict)  # "<sop_uid>:<finding>" -> mask PNG


def index_dicom(folder: Path) -> dict[str, Path]:
    """SOP Instance UID -> file, for every DICOM file under ``folder`` (headers only)."""
    index = {}
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        index[str(ds.SOPInstanceUID)] = path
    return index


def _patient_key(patient: dict[str, Any]) -> str:
    for ident in patient.get("identifier") or []:
        if ident.get("system") == PATIENT_SYSTEM:
            return str(ident["value"])
    return str(patient.get("id") or "")


def record_from_bundle(bundle: dict[str, Any], dicom_index: dict[str, Path]) -> PatientRecord:
    """A ``PatientRecord`` from a transaction bundle, with images from local DICOM files."""
    resources = [(e.get("fullUrl", ""), e.get("resource") or {}) for e in bundle.get("entry", [])]
    by_type: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for url, res in resources:
        by_type.setdefault(res.get("resourceType", ""), []).append((url, res))
    (_, patient), *_ = by_type["Patient"]
    birth = patient.get("birthDate")
    record = PatientRecord(
        patient=Patient(
            id=_patient_key(patient),
            sex=patient.get("gender"),
            birth_date=date.fromisoformat(birth[:10]) if birth else None,
        )
    )
    notes: list[Note] = []
    for url, doc in by_type.get("DocumentReference", []):
        doc = {**doc, "id": doc.get("id") or url.removeprefix("urn:uuid:")}
        try:
            notes.append(note_from_document_reference(doc))
        except NoteError as exc:
            record.missing.append(Missing("text", str(exc), url))
    record.notes = sorted(notes, key=lambda n: (n.date is None, n.date))
    observations = [
        {**obs, "id": obs.get("id") or url.removeprefix("urn:uuid:")}
        for url, obs in by_type.get("Observation", [])
    ]
    record.labs, missing = observations_to_frame(observations)
    record.missing.extend(missing)
    images: list[ImageInput] = []
    for url, study in by_type.get("ImagingStudy", []):
        for series in study.get("series") or []:
            for inst in series.get("instance") or []:
                path = dicom_index.get(inst["uid"])
                if path is None:
                    record.missing.append(Missing("image", f"no file for {inst['uid']}", url))
                    continue
                try:
                    images.append(decode_dicom(path.read_bytes(), reference=url))
                except ImageDecodeError as exc:
                    record.missing.append(Missing("image", str(exc), url))
    record.images = images
    return record


def iter_examples(folder: Path, limit: int | None = None) -> Iterator[Example]:
    """Examples in label-file order; patients without a bundle are an error, not a skip."""
    labels = pd.read_csv(folder / "labels.csv", dtype={"patient_key": str})
    dicom_index = index_dicom(folder)
    rows = labels.to_dict("records")
    for data in rows if limit is None else rows[:limit]:
        key = str(data["patient_key"])
        bundle_path = folder / "bundles" / f"{key}.json"
        if not bundle_path.is_file():
            raise FileNotFoundError(f"labels.csv names {key} but {bundle_path} does not exist")
        record = record_from_bundle(json.loads(bundle_path.read_text()), dicom_index)
        masks = {}
        for finding in FINDING_NAMES:
            for img in record.images:
                mask = folder / "masks" / key / f"{img.sop_uid}_{finding}.png"
                if mask.is_file():
                    masks[f"{img.sop_uid}:{finding}"] = mask
        yield Example(
            key=key,
            record=record,
            labels={f: int(data[f]) for f in FINDING_NAMES if f in data},
            site=str(data.get("site")) if data.get("site") is not None else None,
            sex=str(data.get("sex")) if data.get("sex") is not None else None,
            age_band=str(data.get("age_band")) if data.get("age_band") is not None else None,
            masks=masks,
        )
