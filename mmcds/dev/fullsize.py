"""Full-size radiographs from the synthetic cohort (real CR/DX images are 2,000-3,000 px a side,
the cohort's ~300 px, so training stays fast), and a cohort loaded into local servers: for tests
and benchmarks of what size does to overlays, report bundles and latency."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from mmcds.dev.servers import OrthancPacs
from mmcds.errors import UpstreamError
from mmcds.fhir.client import FhirClient
from mmcds.fhir.dicomweb import DicomWebClient
from mmcds.fhir.load import load_folder
from mmcds.settings import Settings


def enlarge_images(cohort: Path, rows: int = 3000, cols: int = 2500) -> int:
    """Resample every DICOM file under ``cohort/dicom`` to ``rows`` x ``cols`` in place (pixel
    spacing scaled to match); returns how many were enlarged."""
    done = 0
    for path in sorted((cohort / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array.astype(np.float32)
        big = Image.fromarray(stored, "F").resize((cols, rows), Image.Resampling.BILINEAR)
        top = (1 << int(ds.BitsStored)) - 1
        ds.PixelData = np.clip(np.asarray(big), 0, top).astype("<u2").tobytes()
        scale = ds.Rows / rows
        for name in ("PixelSpacing", "ImagerPixelSpacing"):
            if name in ds:
                ds[name].value = [f"{float(v) * scale:.4f}" for v in ds[name].value]
        ds.Rows, ds.Columns = rows, cols
        ds.save_as(path, enforce_file_format=True)
        done += 1
    return done


def load_cohort(folder: Path, fhir_url: str, pacs: OrthancPacs) -> list[str]:
    """Load a cohort folder into a FHIR server and Orthanc; the patient ids on the server."""
    with (
        FhirClient(fhir_url, timeout=120) as fhir,
        DicomWebClient(pacs.dicomweb_url, auth=pacs.auth) as dicom,
    ):
        result = load_folder(folder, fhir, dicom)
        if result.errors:
            raise UpstreamError(f"loading {folder} failed: {result.errors[:3]}")
        return [p["id"] for p in fhir.search("Patient", {"_count": "1000"})]


def local_settings(root: Path, fhir_url: str, pacs: OrthancPacs, models: Path) -> Settings:
    """Settings for a service over these local servers, its database under ``root``."""
    return Settings(
        model_dir=models,
        database_url=f"sqlite:///{root / 'service.db'}",
        fhir_allowlist=[fhir_url],
        fhir_base_url=fhir_url,
        dicomweb_url=pacs.dicomweb_url,
        dicomweb_user=pacs.user,
        dicomweb_password=pacs.password,
    )
