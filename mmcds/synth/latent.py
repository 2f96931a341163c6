"""The latent patient: the truth every modality is drawn from.

Evidence is split on purpose: for each finding a patient has, each modality independently
*expresses* it or not (and with what strength), so the image alone, the notes alone or the labs
alone miss cases that the other modalities catch. Non-finding conditions (another infection,
COPD, chronic kidney disease) produce look-alike evidence in patients without the finding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

from mmcds.findings import SYNTH_FINDINGS
from mmcds.synth.sites import SiteProfile

AGE_BANDS = ((18, 39, "18-39"), (40, 64, "40-64"), (65, 79, "65-79"), (80, 200, "80+"))

# chance that a present finding shows in the notes / in the labs (independent draws)
TEXT_EXPRESSION = {
    "pneumonia": 0.65,
    "heart_failure": 0.55,
    "pleural_effusion": 0.4,
    "pneumothorax": 0.6,
}
LAB_EXPRESSION = {
    "pneumonia": 0.7,
    "heart_failure": 0.65,
    "pleural_effusion": 0.0,
    "pneumothorax": 0.0,
}
# chance that a present finding shows on the radiograph at all (then with a Beta visibility).
# About one in five patients admitted with decompensated heart failure has no congestion on the
# chest radiograph (Collins et al., Ann Emerg Med 2006;47:13-18); the lesion-defined findings
# always leave a mark, however faint.
IMAGE_EXPRESSION = {
    "pneumonia": 1.0,
    "heart_failure": 0.8,
    "pleural_effusion": 1.0,
    "pneumothorax": 1.0,
}
# Beta(a, b) of how visible a present finding is on the radiograph: pneumonia is often subtle
IMAGE_VISIBILITY = {
    "pneumonia": (1.2, 1.8),
    "heart_failure": (1.8, 2.0),
    "pleural_effusion": (1.3, 1.6),
    "pneumothorax": (2.5, 1.4),
}
LOBES = ("RLL", "LLL", "RML", "RUL", "LUL", "lingula")


def age_band(age: int) -> str:
    for lo, hi, band in AGE_BANDS:
        if lo <= age <= hi:
            return band
    raise ValueError(f"age {age} outside the bands (adults only)")


@dataclass
class LatentPatient:
    index: int
    key: str
    site: SiteProfile
    sex: str  # FHIR gender: "female" / "male"
    age: int
    admit: datetime
    days: int  # length of the encounter in days (≥ 1)
    findings: dict[str, bool]
    severity: dict[str, float]
    image_visibility: dict[str, float]  # 0 = absent, or present but not shown on the image
    text_expressed: dict[str, bool]
    lab_expressed: dict[str, bool]
    side: dict[str, str]  # "left" / "right" / "bilateral"
    lobe: str  # where pneumonia sits
    comorbid: dict[str, bool] = field(default_factory=dict)  # non-label look-alikes
    ctr_base: float = 0.45  # cardiothoracic ratio without heart failure
    habitus: float = 1.0  # body width factor

    @property
    def age_band(self) -> str:
        return age_band(self.age)

    @property
    def none(self) -> bool:
        return not any(self.findings.values())

    @property
    def birth_date(self) -> datetime:
        return self.admit - timedelta(days=int(self.age * 365.25) + self.index % 300)


def base_date(seed: int) -> datetime:
    """Dates move with the seed but never with the wall clock."""
    return datetime(2021, 1, 1, 8, 0) + timedelta(days=int(seed) % 730)


def sample_patient(
    rng: np.random.Generator, index: int, key: str, site: SiteProfile, seed: int
) -> LatentPatient:
    sex = "female" if rng.random() < 0.5 else "male"
    age = int(np.clip(round(18 + 77 * rng.beta(2.2, 1.8)), 18, 97))
    old = (age - 18) / 77.0
    comorbid = {
        "other_infection": bool(rng.random() < 0.16),  # UTI, cellulitis: fever, high CRP
        "copd": bool(rng.random() < 0.08 + 0.15 * old),  # dyspnoea, low SpO2
        "ckd": bool(rng.random() < 0.04 + 0.18 * old),  # high NT-proBNP, oedema
        "smoker": bool(rng.random() < 0.25),
        "malignancy": bool(rng.random() < 0.06),
        "hypertension": bool(rng.random() < 0.2 + 0.4 * old),
    }
    prev = site.prevalence
    hf = rng.random() < min(0.9, prev["heart_failure"] * (0.35 + 1.3 * old))
    pna = rng.random() < prev["pneumonia"] * (1.2 if comorbid["copd"] else 1.0)
    ptx_p = prev["pneumothorax"] * (1.4 if sex == "male" else 0.7) * (1.3 if age < 40 else 1.0)
    ptx = rng.random() < ptx_p
    eff_p = prev["pleural_effusion"] + 0.35 * hf + 0.12 * pna + 0.15 * comorbid["malignancy"]
    eff = rng.random() < min(0.9, eff_p)
    findings = {
        "pneumonia": bool(pna),
        "heart_failure": bool(hf),
        "pleural_effusion": bool(eff),
        "pneumothorax": bool(ptx),
    }
    assert tuple(findings) == SYNTH_FINDINGS, "latent model out of step with mmcds.findings"

    severity: dict[str, float] = {}
    visibility: dict[str, float] = {}
    text: dict[str, bool] = {}
    labs: dict[str, bool] = {}
    side: dict[str, str] = {}
    for f in SYNTH_FINDINGS:
        # draw every variable for every finding, present or not, so the random stream (and
        # hence every other patient attribute) does not shift when one label flips
        sev = float(rng.uniform(0.2, 1.0))
        vis = float(rng.beta(*IMAGE_VISIBILITY[f]))
        shows = bool(rng.random() < IMAGE_EXPRESSION[f])
        t = bool(rng.random() < TEXT_EXPRESSION[f])
        lab = bool(rng.random() < LAB_EXPRESSION[f])
        s = ("left", "right", "bilateral")[int(rng.integers(0, 3))]
        present = findings[f]
        severity[f] = sev if present else 0.0
        visibility[f] = vis if present and shows else 0.0
        text[f] = t and present
        labs[f] = lab and present
        side[f] = s
    if findings["pneumothorax"] and side["pneumothorax"] == "bilateral":
        side["pneumothorax"] = "right" if rng.random() < 0.5 else "left"
    if findings["heart_failure"] and findings["pleural_effusion"] and rng.random() < 0.6:
        side["pleural_effusion"] = "bilateral"  # HF effusions are usually bilateral
    lobe = LOBES[int(rng.integers(0, len(LOBES)))]
    admit = base_date(seed) + timedelta(
        days=int(rng.integers(0, 365)),
        hours=int(rng.integers(0, 24)),
        minutes=int(rng.integers(0, 60)),
    )
    days = int(rng.integers(1, 5))
    return LatentPatient(
        index=index,
        key=key,
        site=site,
        sex=sex,
        age=age,
        admit=admit,
        days=days,
        findings=findings,
        severity=severity,
        image_visibility=visibility,
        text_expressed=text,
        lab_expressed=labs,
        side=side,
        lobe=lobe,
        comorbid=comorbid,
        ctr_base=float(np.clip(rng.normal(0.45, 0.04), 0.35, 0.56)),
        habitus=float(np.clip(rng.normal(1.0, 0.06), 0.85, 1.15)),
    )
