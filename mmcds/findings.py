"""The findings the service reports on, with the codes used in FHIR write-back."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    name: str  # stable key used in labels, configs and metrics
    display: str  # words clinicians use
    snomed: str  # SNOMED CT concept for Observation.code / conclusionCode


FINDINGS: tuple[Finding, ...] = (
    Finding("pneumonia", "Pneumonia", "233604007"),
    Finding("heart_failure", "Heart failure", "84114007"),
    Finding("pleural_effusion", "Pleural effusion", "60046008"),
    Finding("pneumothorax", "Pneumothorax", "36118008"),
)
FINDING_NAMES: tuple[str, ...] = tuple(f.name for f in FINDINGS)
BY_NAME = {f.name: f for f in FINDINGS}
