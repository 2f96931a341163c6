"""The labs and vitals the lab encoder knows: LOINC code, canonical UCUM unit, conversions.

One table, shared by the lab encoder (normalisation, features) and the synthetic cohort
(which writes these same codes, sometimes in the alternative units, as real sites do).
A unit not listed for a code is reported as unknown, never silently mixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LabSpec:
    name: str  # short key used in features and explanations
    loinc: str
    display: str
    unit: str  # canonical UCUM unit
    ref_low: float | None
    ref_high: float | None
    category: str = "laboratory"  # FHIR observation-category: "laboratory" or "vital-signs"
    # other UCUM units seen in practice -> factor that converts a value into `unit`
    conversions: dict[str, float] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()  # other LOINC codes for the same analyte


LABS: tuple[LabSpec, ...] = (
    LabSpec("wbc", "6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL",
            4.0, 11.0, conversions={"10*9/L": 1.0, "/uL": 1e-3, "10*3/mm3": 1.0},
            aliases=("26464-8",)),
    LabSpec("crp", "1988-5", "C reactive protein [Mass/volume] in Serum or Plasma", "mg/L",
            0.0, 5.0, conversions={"mg/dL": 10.0}),
    LabSpec("procalcitonin", "33959-8", "Procalcitonin [Mass/volume] in Serum or Plasma",
            "ng/mL", 0.0, 0.1, conversions={"ug/L": 1.0}),
    LabSpec("lactate", "2524-7", "Lactate [Moles/volume] in Serum or Plasma", "mmol/L",
            0.5, 2.0, conversions={"mg/dL": 1 / 9.008}, aliases=("32693-4",)),
    LabSpec("ntprobnp", "33762-6", "Natriuretic peptide.B prohormone N-Terminal [Mass/volume]"
            " in Serum or Plasma", "pg/mL", 0.0, 125.0, conversions={"ng/L": 1.0}),
    LabSpec("troponin", "6598-7", "Troponin T.cardiac [Mass/volume] in Serum or Plasma",
            "ng/mL", 0.0, 0.01, conversions={"ng/L": 1e-3, "ug/L": 1.0}),
    LabSpec("spo2", "59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%",
            95.0, 100.0, category="vital-signs", aliases=("2708-6",)),
    LabSpec("temperature", "8310-5", "Body temperature", "Cel", 36.1, 37.8,
            category="vital-signs", conversions={"[degF]": float("nan")}),
)

BY_LOINC: dict[str, LabSpec] = {code: s for s in LABS for code in (s.loinc, *s.aliases)}
BY_NAME: dict[str, LabSpec] = {s.name: s for s in LABS}


def to_canonical(spec: LabSpec, value: float, unit: str) -> float:
    """Convert ``value`` in ``unit`` to ``spec.unit``; raise ``ValueError`` for unknown units."""
    if unit == spec.unit:
        return value
    if unit == "[degF]" and spec.unit == "Cel":  # affine, not a factor
        return (value - 32.0) * 5.0 / 9.0
    if unit not in spec.conversions:
        raise ValueError(
            f"unknown unit {unit!r} for {spec.name} (LOINC {spec.loinc}); "
            f"expected {spec.unit!r} or one of {sorted(spec.conversions)}"
        )
    return value * spec.conversions[unit]
