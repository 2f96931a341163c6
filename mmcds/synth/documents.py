"""Note parts that are not driven by the findings: boilerplate, records, the prior report.

They make notes long and varied (copy-forward, attestation, outside records) and bring
distractors: past illnesses, and a prior radiograph that is usually normal or shows chronic
cardiomegaly, with the disease words negated.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from mmcds.synth.latent import LatentPatient
from mmcds.synth.vocab import pick

NOTE_TYPES = {  # kind -> (LOINC, display)
    "ed": ("34111-5", "Emergency department Note"),
    "progress": ("11506-3", "Progress note"),
    "radiology": ("18748-4", "Diagnostic imaging study"),
}
FULL_ROS = (
    "Constitutional: negative for weight loss. Eyes: negative for visual changes. "
    "ENT: negative for sore throat, rhinorrhea. GI: negative for abdominal pain, diarrhea, "
    "melena. GU: negative for hematuria. MSK: negative for myalgias, joint swelling. "
    "Skin: negative for rash. Neuro: negative for headache, focal weakness, numbness. "
    "Psych: negative for SI/HI. Heme: negative for easy bruising. All other systems reviewed "
    "and negative except as noted in the HPI."
)
FAMILY_HISTORY = (
    "Mother with HTN and DM2; father deceased of MI at 70.",
    "Non-contributory.",
    "Sister with breast cancer. No family hx of VTE.",
    "Father with COPD (smoker), mother with dementia.",
)
ED_EVENTS = (
    "CXR obtained",
    "labs drawn, blood cultures sent",
    "received 1L LR bolus",
    "placed on 2L NC",
    "given acetaminophen 1 g PO",
    "EKG: sinus rhythm, no acute ST changes",
    "reassessed, resting comfortably",
    "given albuterol/ipratropium neb",
    "discussed with hospitalist, accepted for admission",
    "family updated at bedside",
    "ambulatory SpO2 checked",
    "PIV placed x2",
    "pain improved after medication",
)
MDM = (
    "MDM: Differential diagnosis considered includes infectious, cardiac, pulmonary, "
    "thromboembolic and metabolic causes; ACS felt less likely given history and EKG, PE "
    "considered and risk stratified, aortic dissection not suspected. Data reviewed: "
    "independent interpretation of imaging and EKG, review of external notes. Risk: "
    "decision regarding hospitalization. "
)
ATTESTATION = (
    "I have personally seen and examined the patient, reviewed the nursing triage note, "
    "vital signs, available laboratory results and prior records in the EHR, and discussed "
    "the assessment and plan with the patient, who verbalized understanding and agrees. "
    "Return precautions were reviewed. Total critical care time excluding procedures was not "
    "applicable. This note was prepared in part with voice recognition software and may contain "
    "transcription errors; please contact the author with questions."
)


@dataclass(frozen=True)
class SynthNote:
    kind: str  # key of NOTE_TYPES
    date: datetime
    text: str

    @property
    def loinc(self) -> str:
        return NOTE_TYPES[self.kind][0]

    @property
    def display(self) -> str:
        return NOTE_TYPES[self.kind][1]


def ed_course(p: LatentPatient, rng: np.random.Generator) -> str:
    n = int(rng.integers(2, 8))
    picks = [ED_EVENTS[int(i)] for i in rng.choice(len(ED_EVENTS), size=n, replace=False)]
    times = sorted(p.admit + timedelta(minutes=int(m)) for m in rng.integers(15, 400, size=n))
    return "\n".join(f"{t:%H:%M} - {e}" for t, e in zip(times, picks, strict=True))


PAST_EVENTS = (
    "CAP treated with levofloxacin",
    "a UTI",
    "a COPD exacerbation",
    "syncope",
    "LLE cellulitis",
    "a CHF exacerbation",
    "AKI on CKD",
    "a GI bleed",
    "a fall",
    "a right-sided pleural effusion that resolved",
    "chest pain, ACS ruled out",
)
RECORD_LINES = (
    "Admitted {ago} to an outside hospital for {event}; discharged home after {stay} days "
    "with PCP follow-up.",
    "Seen in clinic {ago} for {event}, managed as an outpatient.",
    "Outside labs from {ago}: CBC unremarkable, BMP notable for Cr {cr}, A1c {a1c}%.",
    "Last TTE {ago}: LVEF {ef}%, mild MR, no pericardial effusion.",
    "Cardiology note {ago} documents stable symptoms on current regimen, no changes made.",
    "Medication reconciliation completed with pharmacy; pt uses a pill organizer and reports "
    "good adherence, though occasionally misses evening doses.",
    "Per daughter, pt has been less active over the past month and eating less, no falls.",
    "Vaccinations: influenza this season, pneumococcal {ago}, COVID boosters up to date.",
    "Goals of care discussed previously {ago}; pt is full code and wishes all measures.",
)


def prior_records(p: LatentPatient, rng: np.random.Generator) -> str:
    n = int(rng.integers(4, 9))
    lines = []
    for i in rng.choice(len(RECORD_LINES), size=n, replace=False):
        ago = pick(
            rng,
            ("2 years ago", "last spring", "6 months ago", "in 2019", "3 months ago", "last year"),
        )
        lines.append(
            RECORD_LINES[int(i)].format(
                ago=ago,
                event=pick(rng, PAST_EVENTS),
                stay=int(rng.integers(2, 8)),
                cr=round(float(rng.uniform(0.7, 2.4)), 1),
                a1c=round(float(rng.uniform(5.4, 9.5)), 1),
                ef=int(rng.integers(25, 65))
                if p.findings["heart_failure"]
                else int(rng.integers(40, 66)),
            )
        )
    return "PRIOR RECORDS REVIEWED:\n" + " ".join(lines) + "\n"


def prior_report(p: LatentPatient, rng: np.random.Generator) -> SynthNote:
    when = p.admit - timedelta(days=int(rng.integers(30, 1500)))
    chronic = (p.findings["heart_failure"] and rng.random() < 0.45) or (
        (p.comorbid["ckd"] or p.comorbid["hypertension"]) and rng.random() < 0.12
    )
    heart = (
        pick(
            rng,
            (
                "Mild cardiomegaly.",
                "The cardiac silhouette is enlarged.",
                "Heart size is mildly enlarged.",
            ),
        )
        if chronic
        else pick(
            rng,
            (
                "Heart size is normal.",
                "Cardiomediastinal silhouette within normal limits.",
                "Normal heart size.",
            ),
        )
    )
    neg = pick(
        rng,
        (
            "No focal consolidation, pleural effusion, or pneumothorax.",
            "Lungs are clear. No effusion or pneumothorax.",
            "No evidence of effusion. No pneumothorax. No consolidation.",
            "No acute airspace disease. Costophrenic angles are sharp.",
        ),
    )
    extra = [
        w
        for w in (
            "Calcified granuloma in the right upper lobe.",
            "Degenerative changes of the thoracic spine.",
            "Old healed left rib fractures.",
            "Median sternotomy wires.",
            "Mild biapical pleural thickening.",
        )
        if rng.random() < 0.15
    ]
    impression = (
        "Cardiomegaly without acute process."
        if chronic
        else pick(
            rng,
            (
                "No acute cardiopulmonary process.",
                "No acute cardiopulmonary abnormality.",
                "Normal chest radiograph.",
            ),
        )
    )
    text = (
        f"EXAM: XR CHEST 2 VIEWS ({when:%m/%d/%Y})\n"
        f"CLINICAL INDICATION: {pick(rng, ('cough', 'pre-op', 'SOB', 'chest pain', 'fall'))}"
        f"\nCOMPARISON: {pick(rng, ('None.', 'None available.', 'Prior outside study.'))}\n"
        f"TECHNIQUE: PA and lateral views of the chest.\n"
        f"FINDINGS: {heart} {neg} {' '.join(extra)}\nIMPRESSION: {impression}\n"
    )
    return SynthNote("radiology", when, text)
