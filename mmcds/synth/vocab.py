"""The notes grammar: slots with alternative phrasings, expanded recursively.

``{slot}`` in a template expands to one alternative of ``SLOTS[slot]`` (itself a template).
Every symptom, exam finding and impression has many phrasings and both polarities, and the
disease words themselves appear negated or hedged in patients without the disease, so no single
fixed phrase carries the label.
"""

from __future__ import annotations

import re

import numpy as np

SLOTS: dict[str, tuple[str, ...]] = {
    "pt": ("Pt", "Patient", "The patient", "pt", "This is a", "Pleasant"),
    "presents": (
        "presents",
        "presenting",
        "who presents to the ED",
        "BIBA",
        "comes in",
        "referred by PCP",
        "walked into triage",
    ),
    "duration": (
        "1 day",
        "2 days",
        "3 days",
        "several days",
        "24h",
        "48 hrs",
        "1 week",
        "the past few days",
        "since yesterday",
        "~5 days",
    ),
    "denies": ("denies", "Denies", "no", "negative for", "pt denies", "reports no", "without"),
    "reports": (
        "reports",
        "endorses",
        "c/o",
        "complains of",
        "notes",
        "+",
        "states she has had",
        "states he has had",
    ),
    "possible": (
        "possible",
        "likely",
        "probable",
        "concerning for",
        "suspicious for",
        "cannot exclude",
        "c/w",
        "suspect",
        "r/o",
        "favor",
    ),
    "doubt": (
        "doubt",
        "low suspicion for",
        "unlikely",
        "less likely",
        "no clear evidence of",
        "not c/w",
        "considered but felt unlikely:",
        "do not suspect",
    ),
    "noevidence": (
        "no evidence of",
        "no",
        "without",
        "negative for",
        "no definite",
        "no convincing",
    ),
    "continue": ("continue", "cont", "c/w", "will continue", "plan to continue"),
    "improved": (
        "feels somewhat better",
        "reports breathing is easier",
        "slept poorly",
        "no acute events overnight",
        "NAEON",
        "tolerating PO",
        "ambulating with PT",
        "still feels tired",
        "appetite improving",
        "overnight nursing notes reviewed",
    ),
}

# symptom -> (positive phrasings, negative phrasings, ROS system)
SYMPTOMS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "fever": (
        (
            "fevers",
            "subjective fevers",
            "fever to 39",
            "febrile at home",
            "f/c",
            "fevers and chills",
            "tmax 38.9 at home",
        ),
        ("fever", "fevers", "f/c", "chills"),
        "Constitutional",
    ),
    "rigors": (
        ("rigors", "shaking chills", "night sweats"),
        ("rigors", "night sweats"),
        "Constitutional",
    ),
    "cough": (
        (
            "productive cough",
            "cough with yellow sputum",
            "cough productive of green sputum",
            "worsening cough",
            "wet cough",
            "cough",
        ),
        ("cough", "sputum production"),
        "Respiratory",
    ),
    "dyspnea": (
        (
            "SOB",
            "shortness of breath",
            "dyspnea",
            "DOE",
            "dyspnea on exertion",
            "increasing SOB",
            "breathlessness walking to the bathroom",
        ),
        ("SOB", "shortness of breath", "dyspnea"),
        "Respiratory",
    ),
    "orthopnea": (
        (
            "orthopnea",
            "sleeping on 3 pillows",
            "PND",
            "waking up gasping at night",
            "unable to lie flat",
        ),
        ("orthopnea", "PND"),
        "Cardiovascular",
    ),
    "edema": (
        (
            "leg swelling",
            "BLE edema",
            "ankle swelling",
            "swollen legs",
            "weight gain of 4 kg",
            "pants feel tight",
        ),
        ("leg swelling", "LE edema", "weight gain"),
        "Cardiovascular",
    ),
    "pleuritic": (
        (
            "pleuritic chest pain",
            "sharp CP worse with inspiration",
            "chest pain on deep breaths",
            "R sided chest pain with breathing",
        ),
        ("chest pain", "CP", "pleuritic pain"),
        "Cardiovascular",
    ),
    "sudden_pain": (
        (
            "sudden onset sharp chest pain",
            "abrupt CP while at rest",
            "acute onset chest pain and SOB",
            "sudden pleuritic CP after coughing fit",
        ),
        ("sudden chest pain",),
        "Cardiovascular",
    ),
    "dysuria": (
        ("dysuria", "urinary frequency", "burning on urination", "suprapubic pain"),
        ("dysuria", "urinary sx"),
        "GU",
    ),
    "skin": (
        (
            "redness and warmth of the L leg",
            "a painful red area on the shin",
            "spreading erythema on the forearm",
        ),
        ("rash", "skin changes"),
        "Skin",
    ),
    "wheeze": (
        ("wheezing", "chronic cough at baseline", "using albuterol more"),
        ("wheezing",),
        "Respiratory",
    ),
    "nausea": (("nausea", "decreased PO intake", "poor appetite"), ("nausea", "vomiting"), "GI"),
}

# exam findings: (positive phrasings, normal phrasings)
EXAM: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "crackles": (
        (
            "crackles at the {side} base",
            "rales {side} base",
            "coarse crackles {side}",
            "{side} basilar crackles",
            "crackles over the {side} lower lung field",
        ),
        ("CTAB", "clear to auscultation bilaterally", "lungs clear", "no crackles"),
    ),
    "bronchial": (
        ("bronchial breath sounds {side}", "egophony at the {side} base"),
        ("no egophony",),
    ),
    "bibasilar": (
        ("bibasilar crackles", "crackles at both bases", "rales bilaterally"),
        ("no rales",),
    ),
    "jvd": (
        ("JVD to the angle of the jaw", "JVP elevated ~12 cm", "+JVD", "HJR positive"),
        ("no JVD", "JVP not elevated", "JVP flat"),
    ),
    "s3": (("S3 gallop", "+S3"), ("RRR, no m/r/g", "regular rate and rhythm", "S1S2 normal")),
    "pitting": (
        ("2+ pitting edema to the knees", "3+ BLE pitting edema", "1+ ankle edema"),
        ("no LE edema", "no peripheral edema", "ext warm, no edema"),
    ),
    "dull": (
        (
            "dullness to percussion {side} base",
            "decreased BS at the {side} base",
            "diminished breath sounds {side} lower field",
        ),
        ("resonant to percussion",),
    ),
    "absent": (
        (
            "absent breath sounds on the {side}",
            "hyperresonance {side} hemithorax",
            "markedly decreased BS {side} with hyperresonance",
        ),
        ("equal breath sounds bilaterally", "symmetric chest rise"),
    ),
    "wheezes": (("scattered expiratory wheezes", "prolonged expiratory phase"), ("no wheezes",)),
}

# finding -> how clinicians name it in assessments
FINDING_WORDS: dict[str, tuple[str, ...]] = {
    "pneumonia": (
        "pneumonia",
        "PNA",
        "CAP",
        "community acquired pneumonia",
        "lobar pneumonia",
        "pulmonary infection",
    ),
    "heart_failure": (
        "CHF exacerbation",
        "acute decompensated heart failure",
        "ADHF",
        "acute on chronic HFrEF",
        "HFpEF exacerbation",
        "volume overload from CHF",
        "heart failure",
    ),
    "pleural_effusion": (
        "pleural effusion",
        "effusion",
        "{side} effusion",
        "{side} pleural effusion",
        "pleural fluid",
    ),
    "pneumothorax": ("pneumothorax", "PTX", "{side} PTX", "spontaneous pneumothorax"),
}

PLANS: dict[str, tuple[str, ...]] = {
    "pneumonia": (
        "ceftriaxone + azithromycin",
        "start abx (CTX/azithro)",
        "blood cx x2, sputum cx",
        "check procalcitonin",
        "IV abx, reassess in 48h",
        "doxycycline PO",
    ),
    "heart_failure": (
        "IV furosemide 40 mg BID",
        "diurese, strict I/O, daily weights",
        "TTE",
        "fluid restrict 1.5 L",
        "cont GDMT, hold if hypotensive",
    ),
    "pleural_effusion": (
        "consider diagnostic thoracentesis",
        "IR for tap if enlarging",
        "repeat imaging",
        "monitor on diuresis",
    ),
    "pneumothorax": (
        "CT surgery consulted for chest tube",
        "needle decompression not needed",
        "repeat CXR in 4h",
        "high-flow O2, observe",
    ),
}

PMH = (
    "HTN",
    "DM2",
    "HLD",
    "GERD",
    "OA",
    "hypothyroidism",
    "BPH",
    "anxiety",
    "depression",
    "obesity",
    "OSA on CPAP",
    "migraine",
    "gout",
    "osteoporosis",
    "remote appendectomy",
    "s/p cholecystectomy",
    "iron deficiency anemia",
    "glaucoma",
)
MEDS = (
    "lisinopril 10 mg daily",
    "metformin 1000 mg BID",
    "atorvastatin 40 mg qHS",
    "amlodipine 5 mg daily",
    "omeprazole 20 mg daily",
    "levothyroxine 75 mcg daily",
    "aspirin 81 mg daily",
    "sertraline 50 mg daily",
    "tamsulosin 0.4 mg qHS",
    "gabapentin 300 mg TID",
    "vitamin D3 2000 IU daily",
    "acetaminophen 650 mg q6h PRN",
    "insulin glargine 20 units qHS",
    "allopurinol 100 mg daily",
    "metoprolol succinate 50 mg daily",
    "carvedilol 12.5 mg BID",
    "furosemide 20 mg daily",
    "albuterol 2 puffs q4h PRN",
    "tiotropium 18 mcg daily",
    "apixaban 5 mg BID",
    "spironolactone 25 mg daily",
    "losartan 50 mg daily",
    "melatonin 3 mg qHS",
    "docusate 100 mg BID",
    "fluticasone nasal spray daily",
    "calcium carbonate 500 mg BID",
)
ALLERGIES = (
    "NKDA",
    "PCN (rash)",
    "sulfa (hives)",
    "NKDA",
    "codeine (nausea)",
    "shellfish",
    "latex",
)
SOCIAL = (
    "Lives with spouse.",
    "Lives alone in an apartment.",
    "Retired teacher.",
    "Works in construction.",
    "Lives with daughter.",
    "Independent in ADLs.",
    "Uses a walker.",
    "Occasional EtOH.",
    "Denies illicit drugs.",
)

SLOT = re.compile(r"\{(\w+)\}")


def expand(
    template: str, rng: np.random.Generator, extra: dict[str, str] | None = None, depth: int = 0
) -> str:
    """Fill every ``{slot}``: from ``extra`` first, then a random alternative of ``SLOTS``."""
    if depth > 6:
        raise RecursionError(f"grammar recursion too deep in {template!r}")

    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        if extra and name in extra:
            return extra[name]
        if name not in SLOTS:
            raise KeyError(f"grammar slot {{{name}}} is not defined in SLOTS")
        alts = SLOTS[name]
        return expand(alts[int(rng.integers(0, len(alts)))], rng, extra, depth + 1)

    return SLOT.sub(one, template)


def pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(0, len(options)))]
