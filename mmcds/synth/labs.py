"""Labs and vitals drawn from the latent patient, sent in each site's units.

Values are generated in the catalogue's canonical unit, then converted to the unit the site's
lab system uses, with the reference range in that same unit. Repeated draws follow each
abnormality back toward baseline over the encounter; some analytes are never ordered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from mmcds.encoders.catalogue import BY_NAME, LabSpec
from mmcds.synth.latent import LatentPatient

# ordered less often than the basic panel, so missing more often
EXTRA_MISSING = {"procalcitonin": 0.35, "troponin": 0.2, "lactate": 0.2, "ntprobnp": 0.1}
VITALS = ("spo2", "temperature")


@dataclass(frozen=True)
class Measurement:
    name: str
    spec: LabSpec
    time: datetime
    value: float  # in the sent unit
    unit: str  # UCUM unit as sent
    ref_low: float | None  # in the sent unit
    ref_high: float | None
    interpretation: str  # "H" / "L" / "N"


def to_site_unit(spec: LabSpec, canonical: float, unit: str) -> float:
    """Inverse of ``catalogue.to_canonical``: canonical value expressed in ``unit``."""
    if unit == spec.unit:
        return canonical
    if unit not in spec.conversions:
        raise ValueError(f"site unit {unit!r} for {spec.name} is not in the catalogue")
    # the catalogue's conversions are affine: canonical = value * factor + offset
    offset = getattr(spec, "offsets", {}).get(unit, 0.0)
    return (canonical - offset) / spec.conversions[unit]


def _round(name: str, unit: str, value: float) -> float:
    if name == "spo2":
        return float(round(value))
    if name == "temperature":
        return round(value, 1)
    if value == 0:
        return 0.0
    digits = 3 - int(math.floor(math.log10(abs(value)))) - 1
    return round(value, max(digits, 0)) if digits > 0 else float(round(value, digits))


def _baseline_and_excess(p: LatentPatient, rng: np.random.Generator) -> dict[str, tuple]:
    """Per analyte: (baseline, excess at admission, noise sd); log-scale for skewed analytes."""
    f, sev, ex, cm = p.findings, p.severity, p.lab_expressed, p.comorbid
    old = (p.age - 18) / 77.0
    u = rng.uniform(0.0, 1.0, size=8)  # independent strengths for the look-alikes
    inf = cm["other_infection"]
    pna_e = ex["pneumonia"]
    hf_e = ex["heart_failure"]
    pna_s, hf_s = sev["pneumonia"], sev["heart_failure"]
    out: dict[str, tuple] = {}
    out["wbc"] = (
        math.log(7.0) + rng.normal(0, 0.22),
        pna_e * math.log(1.4 + 0.9 * pna_s)
        + inf * math.log(1.2 + 0.6 * u[0])
        + f["pneumonia"] * 0.05,
        0.08,
    )
    out["crp"] = (
        math.log(3.0) + rng.normal(0, 0.8),
        pna_e * math.log(12 + 40 * pna_s)
        + inf * math.log(8 + 30 * u[1])
        + f["heart_failure"] * 0.4
        + cm["malignancy"] * math.log(4),
        0.15,
    )
    out["procalcitonin"] = (
        math.log(0.04) + rng.normal(0, 0.45),
        pna_e * math.log(5 + 50 * pna_s) + inf * math.log(3 + 15 * u[2]),
        0.2,
    )
    out["lactate"] = (
        math.log(1.1) + rng.normal(0, 0.22),
        pna_e * (pna_s > 0.65) * math.log(2.0)
        + hf_e * (hf_s > 0.7) * math.log(1.6)
        + inf * (u[3] > 0.7) * math.log(1.8),
        0.1,
    )
    out["ntprobnp"] = (
        math.log(45 * (1 + 4 * old**2)) + rng.normal(0, 0.7),
        hf_e * math.log(8 + 50 * hf_s)
        + f["heart_failure"] * math.log(1.8)
        + cm["ckd"] * math.log(4 + 8 * u[4]),
        0.12,
    )
    out["troponin"] = (
        math.log(0.006) + rng.normal(0, 0.5),
        hf_e * math.log(2 + 3 * hf_s)
        + cm["ckd"] * math.log(2.5)
        + pna_e * (pna_s > 0.8) * math.log(1.8),
        0.15,
    )
    out["spo2"] = (
        97.6 + rng.normal(0, 0.9),
        -(
            4.5 * pna_s * (1.0 if pna_e else 0.25)
            + 4.0 * hf_s * (1.0 if hf_e else 0.3)
            + 3.5 * sev["pneumothorax"]
            + 1.5 * sev["pleural_effusion"]
            + 3.5 * cm["copd"] * (0.5 + u[5])
        ),
        0.9,
    )
    out["temperature"] = (
        36.75 + rng.normal(0, 0.25),
        pna_e * (1.0 + 1.1 * pna_s) + inf * (0.6 + 1.2 * u[6]) + f["pneumonia"] * 0.15,
        0.25,
    )
    return out


def _times(p: LatentPatient, rng: np.random.Generator, name: str) -> list[datetime]:
    first = p.admit + timedelta(minutes=int(rng.integers(10, 120)))
    if name in VITALS:  # triage, then about every eight hours
        n = 1 + int(rng.integers(1, 3 * p.days + 1))
        return [first + timedelta(hours=8 * i, minutes=int(rng.integers(0, 60))) for i in range(n)]
    n = 1 + int(rng.integers(0, p.days))  # admission draw, then morning labs
    return [first] + [
        (p.admit + timedelta(days=d)).replace(hour=6, minute=int(rng.integers(0, 50)))
        for d in range(1, n)
    ]


def draw_labs(p: LatentPatient, rng: np.random.Generator) -> list[Measurement]:
    params = _baseline_and_excess(p, rng)
    out: list[Measurement] = []
    for name, (base, excess, sd) in params.items():
        spec = BY_NAME[name]
        # draw all randoms before deciding missingness so the stream stays aligned
        times = _times(p, rng, name)
        missing = rng.random() < p.site.missing_rate + EXTRA_MISSING.get(name, 0.0)
        noise = rng.normal(0, sd, size=len(times))
        dropped = rng.random(len(times)) < 0.15
        if missing and name not in VITALS:
            continue
        unit = p.site.units.get(name, spec.unit)
        for i, t in enumerate(times):
            if i > 0 and dropped[i]:
                continue
            hours = (t - times[0]).total_seconds() / 3600.0
            level = base + excess * math.exp(-hours / 36.0) + noise[i]  # resolves with treatment
            canonical = (
                float(np.clip(level, 70, 100))
                if name == "spo2"
                else (level if name == "temperature" else math.exp(level))
            )
            value = _round(name, unit, to_site_unit(spec, canonical, unit))
            lo = (
                None
                if spec.ref_low is None
                else _round(name, unit, to_site_unit(spec, spec.ref_low, unit))
            )
            hi = (
                None
                if spec.ref_high is None
                else _round(name, unit, to_site_unit(spec, spec.ref_high, unit))
            )
            interp = (
                "H"
                if hi is not None and value > hi
                else ("L" if lo is not None and value < lo else "N")
            )
            out.append(Measurement(name, spec, t, value, unit, lo, hi, interp))
    return out
