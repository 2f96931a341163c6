"""A synthetic cohort with only some modalities, as a hospital's first data often is.

Removes, in place, what a cohort folder holds of the other modalities: radiographs (DICOM files,
lesion masks, ImagingStudy resources), notes (DocumentReference, DiagnosticReport) or labs
(Observation). Labels stay as they are: the truth does not change with what was recorded.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from mmcds.records import MODALITIES

RESOURCES = {
    "image": {"ImagingStudy"},
    "text": {"DocumentReference", "DiagnosticReport"},
    "labs": {"Observation"},
}


def keep_modalities(folder: Path, keep: Iterable[str]) -> None:
    """Strip every modality of the cohort in ``folder`` but those in ``keep``."""
    keep = set(keep)
    unknown = keep - set(MODALITIES)
    if unknown or not keep:
        raise ValueError(f"keep one or more of {list(MODALITIES)}, not {sorted(unknown)}")
    drop = set().union(*(RESOURCES[m] for m in MODALITIES if m not in keep))
    for path in sorted((folder / "bundles").glob("*.json")):
        bundle = json.loads(path.read_text())
        bundle["entry"] = [
            e for e in bundle.get("entry", []) if e["resource"]["resourceType"] not in drop
        ]
        path.write_text(json.dumps(bundle, indent=1) + "\n")
    if "image" not in keep:
        for sub in ("dicom", "masks"):
            shutil.rmtree(folder / sub, ignore_errors=True)
            (folder / sub).mkdir()
