"""One FHIR R4 transaction Bundle per patient: what an EHR would hold, never the labels.

Patient (conditional create on its identifier, so reloading is idempotent for the patient),
Encounter, lab and vital Observations, DocumentReference notes and the ImagingStudy whose UIDs
match the DICOM files. Plain dicts: validated against ``fhir.resources.R4B`` in the tests.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from mmcds.synth.ids import urn_uuid
from mmcds.synth.image import SOP_CLASS, ImageUIDs
from mmcds.synth.labs import Measurement
from mmcds.synth.latent import LatentPatient
from mmcds.synth.notes import SynthNote

PATIENT_SYSTEM = "urn:mmcds:synth:patient"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
INTERP_DISPLAY = {"H": "High", "L": "Low", "N": "Normal"}
FAMILY = (
    "Rivera",
    "Nguyen",
    "Okafor",
    "Schmidt",
    "Kowalski",
    "Haddad",
    "Tanaka",
    "Silva",
    "Moreau",
    "Novak",
    "Jensen",
    "Costa",
    "Ibrahim",
    "Murphy",
    "Rossi",
    "Petrov",
)
GIVEN_F = ("Ana", "Mei", "Grace", "Fatima", "Ingrid", "Lucia", "Amara", "Sofia", "Hana")
GIVEN_M = ("Jonas", "Ravi", "Tomas", "Kwame", "Luis", "Piotr", "Kenji", "Omar", "Eli")


@dataclass(frozen=True)
class StudyRef:
    uids: ImageUIDs
    started: datetime
    modality: str
    view: str


def patient_name(p: LatentPatient) -> tuple[str, str]:
    h = hashlib.sha256(p.key.encode()).digest()
    given = (GIVEN_F if p.sex == "female" else GIVEN_M)[h[1] % 9]
    return FAMILY[h[0] % len(FAMILY)], given


def instant(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")  # synthetic times are UTC


def _ref(full_url: str) -> dict[str, str]:
    return {"reference": full_url}


def _qty(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def _entry(
    full_url: str, resource: dict[str, Any], if_none_exist: str | None = None
) -> dict[str, Any]:
    request: dict[str, str] = {"method": "POST", "url": resource["resourceType"]}
    if if_none_exist:
        request["ifNoneExist"] = if_none_exist
    return {"fullUrl": full_url, "resource": resource, "request": request}


def _observation(m: Measurement, subject: str, encounter: str, ident: str) -> dict[str, Any]:
    spec = m.spec
    rr: dict[str, Any] = {}
    if m.ref_low is not None:
        rr["low"] = _qty(m.ref_low, m.unit)
    if m.ref_high is not None:
        rr["high"] = _qty(m.ref_high, m.unit)
    cat = "Vital Signs" if spec.category == "vital-signs" else "Laboratory"
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": "urn:mmcds:synth:observation", "value": ident}],
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": spec.category, "display": cat}]}],
        "code": {
            "coding": [{"system": LOINC, "code": spec.loinc, "display": spec.display}],
            "text": spec.name,
        },
        "subject": _ref(subject),
        "encounter": _ref(encounter),
        "effectiveDateTime": instant(m.time),
        "valueQuantity": _qty(m.value, m.unit),
        "interpretation": [
            {
                "coding": [
                    {
                        "system": INTERPRETATION,
                        "code": m.interpretation,
                        "display": INTERP_DISPLAY[m.interpretation],
                    }
                ]
            }
        ],
    }
    if rr:
        obs["referenceRange"] = [rr]
    return obs


def _document(n: SynthNote, subject: str, encounter: str | None, ident: str) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "identifier": [{"system": "urn:mmcds:synth:document", "value": ident}],
        "status": "current",
        "docStatus": "final",
        "type": {"coding": [{"system": LOINC, "code": n.loinc, "display": n.display}]},
        "category": [
            {
                "coding": [
                    {
                        "system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
                        "code": "clinical-note",
                        "display": "Clinical Note",
                    }
                ]
            }
        ],
        "subject": _ref(subject),
        "date": instant(n.date),
        "description": n.display,
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "data": base64.b64encode(n.text.encode("utf-8")).decode("ascii"),
                    "title": f"{n.display} {n.date:%Y-%m-%d}",
                    "creation": instant(n.date),
                }
            }
        ],
    }
    if encounter:
        doc["context"] = {"encounter": [_ref(encounter)]}
    return doc


def _imaging_study(s: StudyRef, subject: str, encounter: str, ident: str) -> dict[str, Any]:
    modality = {"system": DCM, "code": s.modality}
    return {
        "resourceType": "ImagingStudy",
        "identifier": [
            {"system": "urn:dicom:uid", "value": f"urn:oid:{s.uids.study}"},
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
                    ]
                },
                "value": s.uids.accession,
            },
        ],
        "status": "available",
        "modality": [modality],
        "subject": _ref(subject),
        "encounter": _ref(encounter),
        "started": instant(s.started),
        "numberOfSeries": 1,
        "numberOfInstances": 1,
        "description": "XR CHEST 1 VIEW",
        "series": [
            {
                "uid": s.uids.series,
                "number": 1,
                "modality": modality,
                "description": f"CHEST {s.view}",
                "numberOfInstances": 1,
                "bodySite": {
                    "system": "http://snomed.info/sct",
                    "code": "51185008",
                    "display": "Thoracic structure",
                },
                "started": instant(s.started),
                "instance": [
                    {
                        "uid": s.uids.sop,
                        "number": 1,
                        "title": s.view,
                        "sopClass": {
                            "system": "urn:ietf:rfc:3986",
                            "code": f"urn:oid:{SOP_CLASS[s.modality]}",
                        },
                    }
                ],
            }
        ],
    }


def build_bundle(
    p: LatentPatient, seed: int, labs: list[Measurement], notes: list[SynthNote], study: StudyRef
) -> dict[str, Any]:
    pat_url = urn_uuid(seed, p.key, "Patient")
    enc_url = urn_uuid(seed, p.key, "Encounter")
    family, given = patient_name(p)
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": PATIENT_SYSTEM, "value": p.key}],
        "active": True,
        "name": [{"use": "official", "family": family, "given": [given]}],
        "gender": p.sex,
        "birthDate": p.birth_date.strftime("%Y-%m-%d"),
    }
    end = p.admit + timedelta(days=p.days - 1, hours=10)
    encounter = {
        "resourceType": "Encounter",
        "identifier": [{"system": "urn:mmcds:synth:encounter", "value": f"{p.key}-enc"}],
        "status": "finished",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "EMER" if p.days == 1 else "IMP",
            "display": "emergency" if p.days == 1 else "inpatient encounter",
        },
        "subject": _ref(pat_url),
        "period": {"start": instant(p.admit), "end": instant(end)},
    }
    entries = [
        _entry(pat_url, patient, f"identifier={PATIENT_SYSTEM}|{p.key}"),
        _entry(enc_url, encounter),
    ]
    for i, m in enumerate(labs):
        ident = f"{p.key}-obs-{i:03d}"
        entries.append(_entry(urn_uuid(seed, ident), _observation(m, pat_url, enc_url, ident)))
    for i, n in enumerate(notes):
        ident = f"{p.key}-doc-{i:02d}"
        enc = None if n.kind == "radiology" else enc_url  # the prior report is from elsewhere
        entries.append(_entry(urn_uuid(seed, ident), _document(n, pat_url, enc, ident)))
    ident = f"{p.key}-study"
    entries.append(_entry(urn_uuid(seed, ident), _imaging_study(study, pat_url, enc_url, ident)))
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
