"""Full-size radiographs from the synthetic cohort: real CR/DX images are 2,000-3,000 px a side,
the cohort's are ~300 px (so training stays fast). For tests and benchmarks of what size does
to overlays, report bundles and latency."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image


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
