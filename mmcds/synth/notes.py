"""Clinical notes composed from the grammar in ``vocab``: ED note, progress notes, prior report.

A finding shows in the notes only when the latent patient *expresses* it in text; look-alike
conditions (another infection, COPD, CKD) produce the same symptoms in patients without it, and
the disease words themselves appear hedged or negated in many patients who do not have it.
Progress notes copy the ED note's exam and plan forward, as real ones do.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np

from mmcds.synth.documents import (
    ATTESTATION,
    FAMILY_HISTORY,
    FULL_ROS,
    MDM,
    NOTE_TYPES,
    SynthNote,
    ed_course,
    prior_records,
    prior_report,
)
from mmcds.synth.latent import LatentPatient
from mmcds.synth.vocab import (
    ALLERGIES,
    EXAM,
    FINDING_WORDS,
    MEDS,
    PLANS,
    PMH,
    SOCIAL,
    SYMPTOMS,
    expand,
    pick,
)

__all__ = ["NOTE_TYPES", "SynthNote", "write_notes"]

# finding -> {symptom: chance it is reported when the finding is expressed in text}
FINDING_SYMPTOMS = {
    "pneumonia": {"fever": 0.7, "rigors": 0.3, "cough": 0.75, "dyspnea": 0.45, "pleuritic": 0.3},
    "heart_failure": {"dyspnea": 0.8, "orthopnea": 0.55, "edema": 0.65},
    "pleural_effusion": {"dyspnea": 0.5, "pleuritic": 0.3},
    "pneumothorax": {"sudden_pain": 0.8, "dyspnea": 0.55},
}
COMORBID_SYMPTOMS = {
    "other_infection": {"fever": 0.7, "rigors": 0.2, "dysuria": 0.5, "skin": 0.4},
    "copd": {"wheeze": 0.7, "dyspnea": 0.5, "cough": 0.5},
    "ckd": {"edema": 0.4, "nausea": 0.3},
}
FINDING_EXAM = {
    "pneumonia": {"crackles": 0.6, "bronchial": 0.25},
    "heart_failure": {"bibasilar": 0.55, "jvd": 0.5, "s3": 0.2, "pitting": 0.6},
    "pleural_effusion": {"dull": 0.7},
    "pneumothorax": {"absent": 0.7},
}
COMORBID_EXAM = {
    "copd": {"wheezes": 0.5},
    "ckd": {"pitting": 0.3},
    "other_infection": {"crackles": 0.1},
}
# chance an absent finding is still named in the assessment, hedged or negated
NAMED_WHEN_ABSENT = {
    "pneumonia": 0.3,
    "heart_failure": 0.22,
    "pleural_effusion": 0.18,
    "pneumothorax": 0.1,
}


def _side_word(rng: np.random.Generator, side: str) -> str:
    words = {
        "right": ("R", "right", "rt"),
        "left": ("L", "left", "lt"),
        "bilateral": ("bilateral", "B/L", "both"),
    }
    return pick(rng, words[side])


def _pna_side(p: LatentPatient) -> str:
    if p.side["pneumonia"] == "bilateral":
        return "bilateral"
    return "right" if p.lobe.startswith("R") else "left"


def _chances(p: LatentPatient, by_finding: dict, by_comorbid: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for f, table in by_finding.items():
        if p.text_expressed[f]:
            for k, v in table.items():
                out[k] = max(out.get(k, 0.0), v)
    for c, table in by_comorbid.items():
        if p.comorbid[c]:
            for k, v in table.items():
                out[k] = max(out.get(k, 0.0), v)
    return out


def _sides(p: LatentPatient, rng: np.random.Generator) -> dict[str, str]:
    side = {
        "pneumonia": _pna_side(p),
        "pleural_effusion": p.side["pleural_effusion"],
        "pneumothorax": p.side["pneumothorax"],
        "heart_failure": "bilateral",
    }
    return {f: _side_word(rng, s) for f, s in side.items()}


def _exam(p: LatentPatient, rng: np.random.Generator, sides: dict[str, str]) -> str:
    chance = _chances(p, FINDING_EXAM, COMORBID_EXAM)
    side_of = {
        "crackles": sides["pneumonia"],
        "bronchial": sides["pneumonia"],
        "dull": sides["pleural_effusion"],
        "absent": sides["pneumothorax"],
    }
    parts: list[str] = []
    for item, (pos, normal) in EXAM.items():
        if rng.random() < chance.get(item, 0.02):
            parts.append(pick(rng, pos).replace("{side}", side_of.get(item, "R")))
        elif rng.random() < 0.5:
            parts.append(pick(rng, normal))
    hr, rr = int(rng.normal(92, 14)), int(rng.normal(19, 3))
    sbp, dbp = int(rng.normal(132, 18)), int(rng.normal(78, 10))
    gen = pick(
        rng,
        (
            "NAD",
            "appears uncomfortable",
            "mildly tachypneic",
            "well appearing",
            "A&Ox3",
            "speaking in full sentences",
        ),
    )
    return (
        f"PHYSICAL EXAM:\nVitals: HR {hr}, BP {sbp}/{dbp}, RR {rr}.\nGen: {gen}.\n"
        f"Chest/CV/Ext: {'; '.join(parts) or 'unremarkable'}.\n"
    )


def _hpi(p: LatentPatient, rng: np.random.Generator) -> tuple[str, str, str]:
    chance = _chances(p, FINDING_SYMPTOMS, COMORBID_SYMPTOMS)
    pos: list[str] = []
    neg: list[str] = []
    ros: dict[str, list[str]] = {}
    for s, (p_words, n_words, system) in SYMPTOMS.items():
        if rng.random() < chance.get(s, 0.04):
            w = pick(rng, p_words)
            pos.append(w)
            ros.setdefault(system, []).append(f"(+) {w}")
        elif rng.random() < 0.45:
            w = pick(rng, n_words)
            neg.append(w)
            ros.setdefault(system, []).append(f"(-) {w}")
    sex = (
        pick(rng, ("F", "female", "woman"))
        if p.sex == "female"
        else pick(rng, ("M", "male", "man"))
    )
    hist = [h for h in PMH if rng.random() < 0.18]
    if p.comorbid["copd"]:
        hist.append(pick(rng, ("COPD", "COPD on 2L home O2", "emphysema")))
    if p.comorbid["ckd"]:
        hist.append(pick(rng, ("CKD stage 3", "CKD 4", "ESRD on HD MWF")))
    if p.comorbid["hypertension"]:
        hist.append("HTN")
    if p.comorbid["malignancy"]:
        hist.append(pick(rng, ("breast ca s/p lumpectomy", "NSCLC on chemo", "lymphoma")))
    # a history of heart failure is common in both current exacerbations and compensated
    # patients, so it hints rather than labels
    if rng.random() < (0.35 if p.findings["heart_failure"] else 0.06):
        hist.append(pick(rng, ("CHF (EF 30%)", "HFrEF", "HFpEF", "ischemic CMP")))
    hist = list(dict.fromkeys(hist)) or ["no significant PMH"]
    main = (
        ", ".join(pos[:3])
        if pos
        else pick(rng, ("malaise", "generalized weakness", "feeling unwell", "fatigue"))
    )
    lines = [
        expand(
            f"{p.age}yo {sex} w/ h/o {', '.join(hist)} {{presents}} with {main} x {{duration}}.",
            rng,
        )
    ]
    for w in pos[3:]:
        lines.append(expand("Also {reports} " + w + ".", rng))
    if neg:
        lines.append(expand("{denies} " + ", ".join(neg) + ".", rng))
    if p.comorbid["smoker"]:
        lines.append(
            pick(
                rng,
                (
                    "Current smoker, 1 ppd.",
                    "30 pack-year smoking hx.",
                    "Smokes ~10 cigarettes/day.",
                ),
            )
        )
    ros_txt = "\n".join(f"{k}: {', '.join(v)}" for k, v in ros.items()) or "ROS otherwise neg."
    return " ".join(lines), ros_txt, ", ".join(hist)


def _assessment(p: LatentPatient, rng: np.random.Generator, sides: dict[str, str]) -> str:
    items: list[str] = []
    for f, words in FINDING_WORDS.items():
        word = pick(rng, words).replace("{side}", sides[f])
        if p.text_expressed[f]:
            line = expand("{possible} " + word, rng) if rng.random() < 0.6 else word
            plan = "; ".join(sorted({pick(rng, PLANS[f]) for _ in range(2)}))
            items.append(f"# {line[0].upper()}{line[1:]}: {plan}")
        elif not p.findings[f] and rng.random() < NAMED_WHEN_ABSENT[f]:
            tmpl = (
                "{possible} " if rng.random() < 0.25 else pick(rng, ("{doubt} ", "{noevidence} "))
            )
            items.append(expand("# Ddx: " + tmpl + word, rng))
    if p.comorbid["other_infection"]:
        items.append(
            pick(
                rng,
                (
                    "# UTI: UA/UCx, nitrofurantoin",
                    "# Cellulitis: cefazolin, mark borders",
                    "# Sepsis w/o clear source: cultures pending",
                ),
            )
        )
    if p.comorbid["copd"]:
        items.append(pick(rng, ("# COPD: duonebs q6h", "# COPD, at baseline: cont inhalers")))
    if p.comorbid["ckd"]:
        items.append("# CKD: renally dose meds, trend Cr")
    if not items:
        items.append(
            pick(
                rng,
                (
                    "# Symptoms of unclear etiology: observe, reassess",
                    "# Chest discomfort, low risk: trend trop, outpatient f/u",
                ),
            )
        )
    items = [items[int(i)] for i in rng.permutation(len(items))]  # problem order varies
    items.append(expand("# Chronic conditions: {continue} home meds", rng))
    return "ASSESSMENT AND PLAN:\n" + "\n".join(items) + "\n"


def write_notes(p: LatentPatient, rng: np.random.Generator) -> list[SynthNote]:
    sides = _sides(p, rng)
    hpi, ros, hist = _hpi(p, rng)
    exam = _exam(p, rng, sides)
    ap = _assessment(p, rng, sides)
    meds = [m for m in MEDS if rng.random() < 0.3]
    loop = (
        0.35
        if p.findings["heart_failure"]
        else 0.1 * (p.comorbid["ckd"] + p.comorbid["hypertension"])
    )
    if rng.random() < loop:
        meds += [
            "furosemide 40 mg daily",
            pick(rng, ("sacubitril-valsartan 49/51 mg BID", "torsemide 20 mg daily")),
        ]
    social = " ".join(sorted({pick(rng, SOCIAL) for _ in range(2)}))
    ed_time = p.admit + timedelta(minutes=int(rng.integers(30, 180)))
    ed = (
        f"ED PROVIDER NOTE\nCHIEF COMPLAINT: {hpi.split(' with ')[-1].split('.')[0]}\n"
        f"HISTORY OF PRESENT ILLNESS:\n{hpi}\nPAST MEDICAL HISTORY: {hist}\n"
        f"MEDICATIONS:\n"
        + "\n".join(f"- {m}" for m in meds or ["none"])
        + f"\nALLERGIES: {pick(rng, ALLERGIES)}\nSOCIAL HISTORY: {social}\n"
        f"FAMILY HISTORY: {pick(rng, FAMILY_HISTORY)}\n"
        + (prior_records(p, rng) if rng.random() < 0.45 else "")
        + f"REVIEW OF SYSTEMS:\n{ros}\n"
        + (FULL_ROS + "\n" if rng.random() < 0.5 else "")
        + f"{exam}ED COURSE:\n{ed_course(p, rng)}\n"
        + (MDM + "\n" if rng.random() < 0.6 else "")
        + ap
        + (f"ATTESTATION: {ATTESTATION}\n" if rng.random() < 0.6 else "")
    )
    notes = [SynthNote("ed", ed_time, ed)]
    for day in range(1, p.days):
        when = (p.admit + timedelta(days=day)).replace(hour=int(rng.integers(9, 13)))
        body = [
            f"PROGRESS NOTE - HOSPITAL DAY {day + 1}",
            expand("SUBJECTIVE: {improved}. {improved}.", rng),
        ]
        paste = rng.random()
        if paste < 0.3:  # copy-forward bloat: the whole admission note pasted again
            body.append(f"--- Admission note (copied) ---\n{ed}--- end of copied note ---")
        elif paste < 0.7:  # or just its HPI
            body.append(f"HPI (from admission): {hpi}")
        body.append(
            "OBJECTIVE:\n"
            + (exam if rng.random() < 0.7 else "Exam unchanged from prior.\n")
            + "LABS: reviewed."
        )
        body.append(
            ap.rstrip()
            + ("\n(copied forward from prior note)" if rng.random() < 0.5 else "")
            + "\n"
            + expand("Dispo: {continue} inpatient care.", rng)
        )
        notes.append(SynthNote("progress", when, "\n".join(body) + "\n"))
    if rng.random() < 0.55:
        notes.append(prior_report(p, rng))
    return notes
