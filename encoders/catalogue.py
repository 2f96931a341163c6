"""The labs and vitals the lab encoder knows: LOINC code, canonical UCUM unit, conversions.

One table, shared by the lab encoder (normalisation, features) and the synthetic cohort
(which writes these same codes, sometimes in the alternative units, as real sites do).
A unit not listed for a code is reported as unknown, never silently mixed.

Conversions are affine: ``canonical = value * conversions[unit] + offsets.get(unit, 0)``. Only
temperature needs an offset; every other conversion is a pure factor.
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
    # additive term applied after the factor, for affine scales (degF -> Cel)
    offsets: dict[str, float] = field(default_factory=dict)


LABS: tuple[LabSpec, ...] = (
    LabSpec(
        "wbc",
        "6690-2",
        "Leukocytes [#/volume] in Blood by Automated count",
        "10*3/uL",
        4.0,
        11.0,
        conversions={"10*9/L": 1.0, "/uL": 1e-3, "10*3/mm3": 1.0},
        aliases=("26464-8",),
    ),
    # 30522-7 is high-sensitivity CRP: same analyte and unit, a lower reporting limit
    LabSpec(
        "crp",
        "1988-5",
        "C reactive protein [Mass/volume] in Serum or Plasma",
        "mg/L",
        0.0,
        5.0,
        conversions={"mg/dL": 10.0},
        aliases=("30522-7",),
    ),
    LabSpec(
        "procalcitonin",
        "33959-8",
        "Procalcitonin [Mass/volume] in Serum or Plasma",
        "ng/mL",
        0.0,
        0.1,
        conversions={"ug/L": 1.0},
    ),
    LabSpec(
        "lactate",
        "2524-7",
        "Lactate [Moles/volume] in Serum or Plasma",
        "mmol/L",
        0.5,
        2.0,
        conversions={"mg/dL": 1 / 9.008},
        aliases=("32693-4",),
    ),
    LabSpec(
        "ntprobnp",
        "33762-6",
        "Natriuretic peptide.B prohormone N-Terminal [Mass/volume] in Serum or Plasma",
        "pg/mL",
        0.0,
        125.0,
        conversions={"ng/L": 1.0},
    ),
    LabSpec(
        "troponin",
        "6598-7",
        "Troponin T.cardiac [Mass/volume] in Serum or Plasma",
        "ng/mL",
        0.0,
        0.01,
        conversions={"ng/L": 1e-3, "ug/L": 1.0},
    ),
    LabSpec(
        "spo2",
        "59408-5",
        "Oxygen saturation in Arterial blood by Pulse oximetry",
        "%",
        95.0,
        100.0,
        category="vital-signs",
        aliases=("2708-6",),
    ),
    # 8331-1 is oral temperature (Synthea sends it; the FHIR spec example codes both)
    LabSpec(
        "temperature",
        "8310-5",
        "Body temperature",
        "Cel",
        36.1,
        37.8,
        category="vital-signs",
        conversions={"[degF]": 5.0 / 9.0},
        offsets={"[degF]": -32.0 * 5.0 / 9.0},
        aliases=("8331-1",),
    ),
)

# Spellings real systems send in `Quantity.unit` (or in a non-UCUM `code`) -> the UCUM code.
# Looked up case-insensitively; only listed spellings are rewritten, so a genuinely unknown
# unit still surfaces as unknown instead of being guessed at.
UNIT_ALIASES: dict[str, str] = {
    "10^3/ul": "10*3/uL",
    "x10e3/ul": "10*3/uL",
    "k/ul": "10*3/uL",
    "10*3/ul": "10*3/uL",
    "thou/ul": "10*3/uL",
    "10^3/mm3": "10*3/mm3",
    "10*3/mm3": "10*3/mm3",
    "10^9/l": "10*9/L",
    "x10e9/l": "10*9/L",
    "10*9/l": "10*9/L",
    "/ul": "/uL",
    "cells/ul": "/uL",
    "/mm3": "/uL",
    "mg/dl": "mg/dL",
    "mg/l": "mg/L",
    "mmol/l": "mmol/L",
    "ng/ml": "ng/mL",
    "ng/l": "ng/L",
    "pg/ml": "pg/mL",
    "ug/l": "ug/L",
    "\u00b5g/l": "ug/L",
    "\u03bcg/l": "ug/L",
    "mcg/l": "ug/L",
    "%": "%",
    "percent": "%",
    "cel": "Cel",
    "degc": "Cel",
    "deg c": "Cel",
    "\u00b0c": "Cel",
    "degrees c": "Cel",
    "[degf]": "[degF]",
    "degf": "[degF]",
    "deg f": "[degF]",
    "\u00b0f": "[degF]",
    "degrees f": "[degF]",
}

BY_LOINC: dict[str, LabSpec] = {code: s for s in LABS for code in (s.loinc, *s.aliases)}
BY_NAME: dict[str, LabSpec] = {s.name: s for s in LABS}


def ucum(unit: str) -> str:
    """The UCUM code for a unit as sent: known human spellings rewritten, anything else as is."""
    text = unit.strip()
    return UNIT_ALIASES.get(text.lower(), text)


def to_canonical(spec: LabSpec, value: float, unit: str | None) -> float:
    """Convert ``value`` in ``unit`` to ``spec.unit``; raise ``ValueError`` for unknown units."""
    code = ucum(unit) if unit else ""
    if code == spec.unit:
        return value
    if code not in spec.conversions:
        raise ValueError(
            f"unknown unit {unit!r} for {spec.name} (LOINC {spec.loinc}); "
            f"expected {spec.unit!r} or one of {sorted(spec.conversions)}"
        )
    return value * spec.conversions[code] + spec.offsets.get(code, 0.0)
