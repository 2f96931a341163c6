"""A folder of FHIR bundles + DICOM files + a labels file, read as training examples.

Training reads the same resources the hook reads from the servers, through the same record
builder (``mmcds.fhir.gather.gather_patient`` over ``BundleFhir`` and ``LocalDicom``), so the
model sees at training time exactly what it sees in service. The labels come from a separate
file and never from inside the FHIR data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmcds.errors import InputRejected
from mmcds.fhir.bundle_source import BundleFhir, LocalDicom
from mmcds.fhir.gather import gather_patient
from mmcds.findings import SYNTH_FINDINGS, Finding, resolve
from mmcds.fusion.data import EncodedSet
from mmcds.records import Encodings, PatientRecord

PATIENT_SYSTEM = "urn:mmcds:synth:patient"
#: Labels-file columns that describe the patient, not a finding.
META_COLUMNS = frozenset(
    {"patient_key", "site", "sex", "age", "age_band", "study_uid", "sop_uids", "view"}
)
#: Column prefixes of analysis-only values (the synthetic cohort's truths and mask paths).
META_PREFIXES = ("true_", "mask_")


def cohort_findings(
    folder: Path, chosen: Sequence[str] | None = None, site_catalogue: Path | str | None = None
) -> list[Finding]:
    """The findings a model trained on ``folder`` learns: ``chosen`` if given, else those the
    cohort's ``cohort.json`` names (the synthetic cohort's four), else every finding column of
    ``labels.csv``. A column that is neither a patient column nor in the finding catalogue is an
    error naming the catalogue (a site adds its findings with its own catalogue file)."""
    columns = list(pd.read_csv(folder / "labels.csv", nrows=0).columns)
    if chosen:
        names = list(chosen)
        absent = [n for n in names if n not in columns]
        if absent:
            raise InputRejected(f"{folder / 'labels.csv'} has no column for {absent}")
    else:
        meta = folder / "cohort.json"
        listed = json.loads(meta.read_text()).get("findings") if meta.is_file() else None
        names = (
            list(listed)
            if listed
            else [c for c in columns if c not in META_COLUMNS and not c.startswith(META_PREFIXES)]
        )
    if not names:
        raise InputRejected(f"{folder / 'labels.csv'} has no finding column")
    return resolve(names, site_catalogue)


@dataclass
class Example:
    key: str
    record: PatientRecord
    labels: dict[str, int]
    site: str | None = None
    sex: str | None = None
    age_band: str | None = None
    masks: dict[str, Path] = field(default_factory=dict)  # "<sop_uid>:<finding>" -> mask PNG


def _patient_key(patient: dict[str, Any]) -> str:
    for ident in patient.get("identifier") or []:
        if ident.get("system") == PATIENT_SYSTEM:
            return str(ident["value"])
    return str(patient.get("id") or "")


def record_from_bundle(bundle: dict[str, Any], dicom: LocalDicom) -> PatientRecord:
    """A ``PatientRecord`` from a patient's transaction bundle and local DICOM files, built by
    the service's own ``gather_patient`` (so the same quality gate, modality filter, decoders
    and narratives apply)."""
    source = BundleFhir(bundle)
    return gather_patient(source, dicom, _patient_key(source.patient))


def iter_examples(
    folder: Path, limit: int | None = None, findings: Sequence[str] = SYNTH_FINDINGS
) -> Iterator[Example]:
    """Examples in label-file order; patients without a bundle are an error, not a skip."""
    labels = pd.read_csv(folder / "labels.csv", dtype={"patient_key": str})
    dicom = LocalDicom.from_folder(folder)
    rows = labels.to_dict("records")
    for data in rows if limit is None else rows[:limit]:
        key = str(data["patient_key"])
        bundle_path = folder / "bundles" / f"{key}.json"
        if not bundle_path.is_file():
            raise FileNotFoundError(f"labels.csv names {key} but {bundle_path} does not exist")
        record = record_from_bundle(json.loads(bundle_path.read_text()), dicom)
        masks = {}
        for finding in findings:
            for img in record.images:
                mask = folder / "masks" / key / f"{img.sop_uid}_{finding}.png"
                if mask.is_file():
                    masks[f"{img.sop_uid}:{finding}"] = mask
        yield Example(
            key=key,
            record=record,
            labels={f: int(data[f]) for f in findings if f in data},
            site=str(data.get("site")) if data.get("site") is not None else None,
            sex=str(data.get("sex")) if data.get("sex") is not None else None,
            age_band=str(data.get("age_band")) if data.get("age_band") is not None else None,
            masks=masks,
        )


def encode_examples(
    examples: Iterable[Example],
    encode: Callable[[Example], Encodings],
    findings: Sequence[str],
) -> EncodedSet:
    keys, encs, labels, sites, sex, bands = [], [], [], [], [], []
    for ex in examples:
        missing = [f for f in findings if f not in ex.labels]
        if missing:
            raise ValueError(f"labels for {ex.key} lack {missing}: the labels file must name them")
        keys.append(ex.key)
        encs.append(encode(ex))
        labels.append([ex.labels[f] for f in findings])
        sites.append(ex.site)
        sex.append(ex.sex)
        bands.append(ex.age_band)
    return EncodedSet(
        keys,
        encs,
        np.asarray(labels, dtype=np.float32).reshape(-1, len(findings)),
        list(findings),
        sites,
        sex,
        bands,
    )
