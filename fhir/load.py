"""``mmcds load DIR``: FHIR transaction bundles to a FHIR server, DICOM files to a PACS.

Bundles are posted as they are (``urn:uuid:`` references and conditional references resolved by
the server), exactly as a real EHR extract would arrive. Files are processed in sorted order so
a load is reproducible; a bad file is reported and the load goes on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mmcds.fhir.client import FhirClient, FhirError
from mmcds.fhir.dicomweb import DicomWebClient, DicomWebError

DICOM_BATCH = 16


@dataclass
class LoadResult:
    bundles: int = 0
    resources: int = 0
    dicom: int = 0
    errors: list[str] = field(default_factory=list)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    with path.open("rb") as fh:
        fh.seek(128)
        return fh.read(4) == b"DICM"


def load_folder(
    folder: Path,
    fhir: FhirClient,
    pacs: DicomWebClient | None,
    progress: Callable[[str], None] = lambda _: None,
) -> LoadResult:
    result = LoadResult()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    # Only transaction/batch Bundles are data; other JSON (labels, cohort metadata) is not.
    for path in (p for p in files if p.suffix.lower() == ".json"):
        try:
            bundle = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            result.errors.append(f"{path}: not JSON ({exc})")
            continue
        if (
            not isinstance(bundle, dict)
            or bundle.get("resourceType") != "Bundle"
            or bundle.get("type") not in ("transaction", "batch")
        ):
            continue
        try:
            response = fhir.transaction(bundle)
        except FhirError as exc:
            result.errors.append(f"{path.name}: {exc}")
            continue
        result.bundles += 1
        result.resources += len(response.get("entry") or [])
        progress(f"bundle {path.name}: {len(bundle.get('entry') or [])} entries")
    dicom_files = [p for p in files if p.suffix.lower() != ".json" and _is_dicom(p)]
    if dicom_files and pacs is None:
        result.errors.append(f"{len(dicom_files)} DICOM file(s) skipped: no PACS configured")
        return result
    assert pacs is not None or not dicom_files
    for start in range(0, len(dicom_files), DICOM_BATCH):
        batch = dicom_files[start : start + DICOM_BATCH]
        try:
            pacs.store(p.read_bytes() for p in batch)  # type: ignore[union-attr]
            result.dicom += len(batch)
            progress(f"stored {result.dicom}/{len(dicom_files)} DICOM files")
        except DicomWebError as exc:
            result.errors.append(f"DICOM batch starting {batch[0].name}: {exc}")
    return result
