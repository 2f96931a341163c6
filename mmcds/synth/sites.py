"""Acquisition sites: prevalence, scanner look and lab units differ between them.

The differences are the point: a model trained at one site meets a different contrast curve,
noise level, resolution, photometric interpretation and set of UCUM units at another, as real
multi-site deployments do.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from mmcds.findings import SYNTH_FINDINGS


@dataclass(frozen=True)
class SiteProfile:
    name: str  # short key used in labels ("A")
    institution: str  # DICOM InstitutionName ("Site A")
    # base prevalence of each finding before comorbidity effects (effusion also follows HF)
    prevalence: dict[str, float]
    shape: tuple[int, int]  # image rows, columns
    pixel_spacing_mm: float
    modality: str  # "CR" or "DX"
    photometric: str  # "MONOCHROME2" or "MONOCHROME1"
    bits_stored: int
    gamma: float  # contrast curve applied to density before quantisation
    contrast: float  # slope of the sigmoid that maps density into detector range
    noise: float  # quantum noise sigma, in fraction of the full range
    blur: float  # point-spread sigma in pixels (lower resolution)
    rescale_slope: float
    rescale_intercept: float
    manufacturer: str
    # analyte name -> UCUM unit sent by this site's LIS (catalogue canonical when absent)
    units: dict[str, str] = field(default_factory=dict)
    missing_rate: float = 0.15  # chance that a given lab is never drawn in an encounter
    # positioning / collimation protocol: >1 zooms in; shift moves the patient in the frame
    fov_zoom: float = 1.0
    fov_shift: tuple[float, float] = (0.0, 0.0)  # (x, y) as fractions of the image


SITES: dict[str, SiteProfile] = {
    "A": SiteProfile(
        name="A",
        institution="Site A",
        prevalence={
            "pneumonia": 0.32,
            "heart_failure": 0.20,
            "pleural_effusion": 0.10,
            "pneumothorax": 0.12,
        },
        shape=(320, 288),
        pixel_spacing_mm=1.35,
        modality="DX",
        photometric="MONOCHROME2",
        bits_stored=12,
        gamma=1.0,
        contrast=1.0,
        noise=0.012,
        blur=0.6,
        rescale_slope=1.0,
        rescale_intercept=0.0,
        manufacturer="Synthetic Radiography Co",
        units={},
        missing_rate=0.12,
    ),
    "B": SiteProfile(
        name="B",
        institution="Site B",
        prevalence={
            "pneumonia": 0.20,
            "heart_failure": 0.32,
            "pleural_effusion": 0.08,
            "pneumothorax": 0.16,
        },
        shape=(256, 256),
        pixel_spacing_mm=1.7,
        modality="CR",
        photometric="MONOCHROME1",
        bits_stored=14,
        gamma=0.7,
        contrast=1.5,
        noise=0.03,
        blur=1.2,
        rescale_slope=0.5,
        rescale_intercept=-1024.0,
        manufacturer="Example Imaging Systems",
        units={
            "wbc": "10*9/L",
            "crp": "mg/dL",
            "troponin": "ng/L",
            "lactate": "mg/dL",
            "procalcitonin": "ug/L",
            "ntprobnp": "ng/L",
        },
        missing_rate=0.2,
        fov_zoom=1.15,
        fov_shift=(0.0, 0.05),
    ),
    "C": SiteProfile(
        name="C",
        institution="Site C",
        prevalence={
            "pneumonia": 0.26,
            "heart_failure": 0.26,
            "pleural_effusion": 0.12,
            "pneumothorax": 0.05,
        },
        shape=(384, 352),
        pixel_spacing_mm=1.1,
        modality="DX",
        photometric="MONOCHROME2",
        bits_stored=16,
        gamma=1.3,
        contrast=0.8,
        noise=0.02,
        blur=0.9,
        rescale_slope=1.0,
        rescale_intercept=0.0,
        manufacturer="Synthetic Radiography Co",
        units={"temperature": "[degF]", "wbc": "/uL"},
        missing_rate=0.15,
        fov_zoom=0.92,
        fov_shift=(0.02, -0.03),
    ),
}


def site_profile(name: str) -> SiteProfile:
    """The profile of a named site; names beyond A/B/C get a profile derived from the name."""
    if name in SITES:
        return SITES[name]
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"site name {name!r}: use letters, digits, '-' or '_' (e.g. A, B, C)")
    # deterministic variation from the name itself, so a site D is the same in every run
    h = hashlib.sha256(name.encode()).digest()
    base = SITES["ABC"[h[0] % 3]]
    prev = {f: round(0.06 + 0.3 * h[1 + i] / 255, 3) for i, f in enumerate(SYNTH_FINDINGS)}
    return SiteProfile(
        name=name,
        institution=f"Site {name}",
        prevalence=prev,
        shape=(256 + 32 * (h[6] % 5), 256 + 32 * (h[7] % 4)),
        pixel_spacing_mm=base.pixel_spacing_mm,
        modality=base.modality,
        photometric="MONOCHROME1" if h[8] % 3 == 0 else "MONOCHROME2",
        bits_stored=(12, 14, 16)[h[9] % 3],
        gamma=0.6 + 0.8 * h[10] / 255,
        contrast=0.7 + 0.9 * h[11] / 255,
        noise=0.01 + 0.03 * h[12] / 255,
        blur=0.5 + 1.0 * h[13] / 255,
        rescale_slope=base.rescale_slope,
        rescale_intercept=base.rescale_intercept,
        manufacturer=base.manufacturer,
        units=dict(base.units),
        missing_rate=base.missing_rate,
        fov_zoom=0.9 + 0.3 * h[14] / 255,
        fov_shift=(0.04 * (h[15] / 255 - 0.5), 0.08 * (h[16] / 255 - 0.5)),
    )
