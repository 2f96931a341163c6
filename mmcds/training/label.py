"""``mmcds label``: a folder of reports + a site's structured labels -> a cohort ``mmcds train``
reads (``bundles/<key>.json`` with a Patient and the report as a DocumentReference,
``labels.csv``, empty ``dicom/`` and ``masks/``).

Reports are ``<patient_key>.txt`` files. The labels CSV has a ``patient_key`` column and one
column per catalogue finding with 1, 0, -1 (uncertain, as CheXpert) or blank (not mentioned,
read as 0, as CheXpert's own recipes do). Uncertain labels follow ``uncertain``: ``zeros`` or
``ones`` map them to 0 or 1; ``ignore`` keeps the patient and writes the label as unknown (-1,
``mmcds.fusion.data.UNKNOWN``): training masks that one label out of the loss, and calibration,
validation and evaluation leave the patient out of that finding only.
"""

from __future__ import annotations

import base64
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pandas as pd

from mmcds.errors import InputRejected
from mmcds.findings import resolve
from mmcds.training.dataset import META_COLUMNS, PATIENT_SYSTEM

Uncertain = Literal["ignore", "zeros", "ones"]
RADIOLOGY_LOINC = "18748-4"  # Diagnostic imaging study


def _bundle(key: str, text: str, date: str) -> dict:
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": PATIENT_SYSTEM, "value": key}],
    }
    doc = {
        "resourceType": "DocumentReference",
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": RADIOLOGY_LOINC}]},
        "subject": {"reference": "urn:uuid:patient"},
        "date": date,
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
                }
            }
        ],
    }
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:patient", "resource": patient,
             "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": "urn:uuid:report", "resource": doc,
             "request": {"method": "POST", "url": "DocumentReference"}},
        ],
    }  # fmt: skip


def label_reports(
    reports: Path,
    labels_csv: Path,
    out: Path,
    uncertain: Uncertain = "ignore",
    site_catalogue: str | None = None,
) -> dict[str, int]:
    """Write the cohort under ``out``; returns counts (patients written, uncertain labels and
    what became of them: ``masked`` under ``ignore``, else ``mapped``)."""
    if uncertain not in ("ignore", "zeros", "ones"):
        raise InputRejected(f"uncertain policy {uncertain!r}: choose ignore, zeros or ones")
    table = pd.read_csv(labels_csv, dtype={"patient_key": str})
    if "patient_key" not in table.columns:
        raise InputRejected(f"{labels_csv} needs a patient_key column")
    names = [c for c in table.columns if c not in META_COLUMNS]
    resolve(names, site_catalogue)  # unknown column -> error naming the catalogue
    values = table[names].apply(pd.to_numeric, errors="coerce").fillna(0)
    bad = ~values.isin([-1, 0, 1]).all(axis=1)
    if bad.any():
        raise InputRejected(
            f"{labels_csv}: labels must be 1, 0, -1 or blank (rows {list(bad[bad].index)[:5]})"
        )
    n_unsure = int((values == -1).to_numpy().sum())
    if uncertain != "ignore":
        values = values.replace(-1, 0 if uncertain == "zeros" else 1)
    if out.exists():
        shutil.rmtree(out)
    for sub in ("bundles", "dicom", "masks"):
        (out / sub).mkdir(parents=True)
    rows = []
    for i in table.index:
        key = str(table.at[i, "patient_key"])
        path = reports / f"{key}.txt"
        if not path.is_file():
            raise InputRejected(f"{labels_csv} names {key} but {path} does not exist")
        date = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")
        bundle = _bundle(key, path.read_text(encoding="utf-8"), date)
        (out / "bundles" / f"{key}.json").write_text(json.dumps(bundle, indent=1))
        row = {c: table.at[i, c] for c in table.columns if c in META_COLUMNS}
        row.update({n: int(values.at[i, n]) for n in names})
        rows.append(row)
    pd.DataFrame(rows).to_csv(out / "labels.csv", index=False)
    verb = "masked" if uncertain == "ignore" else "mapped"
    return {"patients": len(rows), f"uncertain_labels_{verb}": n_unsure}
