"""Quality gate for decoded images before a chest X-ray model sees them.

A "reject" issue means the image must not be scored (the caller records it as missing with the
message); a "warn" issue is scored but should be shown to the clinician. Thresholds were set on
the real reference files (NEMA CR, NIH DX, SIIM CR), whose clipped fraction is below 0.3 % and
whose standard deviation is 0.15-0.21, so the gate does not fire on ordinary chest films.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mmcds.records import ImageInput

Severity = Literal["reject", "warn"]

#: Projection radiography; "DR" is not a DICOM Modality term but some gateways send it.
CHEST_MODALITIES = frozenset({"CR", "DX", "DR"})
#: Captures of unknown provenance: possibly a radiograph, so scored with a warning.
UNCERTAIN_MODALITIES = frozenset({"OT", "SC"})
_CHEST_WORDS = ("CHEST", "THORAX", "LUNG")
_UNINFORMATIVE_BODY_PARTS = frozenset({"", "UNKNOWN", "OTHER", "NONE", "ANY"})
_FRONTAL_VIEWS = frozenset({"PA", "AP"})

MIN_SIDE = 64
BLANK_STD = 0.01
SATURATED_WARN = 0.3
SATURATED_REJECT = 0.7
# Pixels within this distance of 0 or 1 count as clipped (half an 8-bit grey level).
_CLIP_EPS = 0.5 / 255


@dataclass(frozen=True)
class QualityIssue:
    code: str  # "modality", "body_part", "tiny", "blank", "saturated", "inverted"
    message: str
    severity: Severity


def check_quality(image: ImageInput) -> list[QualityIssue]:
    """Every problem found, rejects first; an empty list means the image is fit for scoring."""
    issues = [*_metadata_issues(image), *_pixel_issues(image.pixels, image.view)]
    return sorted(issues, key=lambda issue: issue.severity != "reject")


def is_usable(issues: Iterable[QualityIssue]) -> bool:
    return all(issue.severity != "reject" for issue in issues)


def _metadata_issues(image: ImageInput) -> list[QualityIssue]:
    issues: list[QualityIssue] = []
    modality = (image.modality or "").strip().upper()
    if not modality:
        issues.append(
            QualityIssue("modality", "modality unknown; assumed to be a chest radiograph", "warn")
        )
    elif modality in UNCERTAIN_MODALITIES:
        issues.append(
            QualityIssue(
                "modality",
                f"modality {modality} (secondary capture): not known to be a radiograph",
                "warn",
            )
        )
    elif modality not in CHEST_MODALITIES:
        issues.append(
            QualityIssue(
                "modality",
                f"modality {modality} is not projection radiography (CR/DX); "
                "the chest X-ray model cannot score it",
                "reject",
            )
        )
    body_part = (image.body_part or "").strip().upper()
    if body_part not in _UNINFORMATIVE_BODY_PARTS and not any(
        word in body_part for word in _CHEST_WORDS
    ):
        issues.append(
            QualityIssue(
                "body_part",
                f"body part examined is {body_part}, not the chest",
                "reject",
            )
        )
    return issues


def _pixel_issues(pixels: np.ndarray, view: str | None) -> list[QualityIssue]:
    if pixels.ndim != 2:
        return [QualityIssue("shape", f"pixels have shape {pixels.shape}, not (H, W)", "reject")]
    height, width = pixels.shape
    if min(height, width) < MIN_SIDE:
        return [
            QualityIssue(
                "tiny",
                f"image is {height}x{width} pixels; at least {MIN_SIDE} a side is needed",
                "reject",
            )
        ]
    issues: list[QualityIssue] = []
    std = float(pixels.std())
    if std < BLANK_STD:
        return [QualityIssue("blank", f"image is blank (standard deviation {std:.4f})", "reject")]
    clipped = float(np.mean((pixels <= _CLIP_EPS) | (pixels >= 1.0 - _CLIP_EPS)))
    if clipped >= SATURATED_WARN:
        severity: Severity = "reject" if clipped >= SATURATED_REJECT else "warn"
        issues.append(
            QualityIssue(
                "saturated",
                f"{clipped:.0%} of pixels are clipped to black or white",
                severity,
            )
        )
    if (view or "").strip().upper() in _FRONTAL_VIEWS | {""} and _looks_inverted(pixels):
        issues.append(
            QualityIssue(
                "inverted",
                "mediastinum is darker than the lungs: the image may be a negative "
                "(PhotometricInterpretation mislabelled?)",
                "warn",
            )
        )
    return issues


def _looks_inverted(pixels: np.ndarray) -> bool:
    """On a frontal chest film the central band (spine, heart) is denser than the lung bands.

    A heuristic, hence only a warning: it catches MONOCHROME1/2 mislabelling, the commonest way
    an image reaches a model as a negative.
    """
    height, width = pixels.shape
    rows = slice(height // 3, 2 * height // 3)
    band = max(1, width // 10)
    centre = pixels[rows, width // 2 - band // 2 : width // 2 + band // 2 + 1]
    left = pixels[rows, width // 4 - band // 2 : width // 4 + band // 2 + 1]
    right = pixels[rows, 3 * width // 4 - band // 2 : 3 * width // 4 + band // 2 + 1]
    lungs = (float(left.mean()) + float(right.mean())) / 2
    return float(centre.mean()) < lungs - 0.1
