"""Evidence that means what it says: assertion status, direction, no boilerplate, clinical units,
labs in words, and upstream errors as one plain line (issue 21, item 4)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pandas as pd
import pytest

from mmcds.explain.assertion import assertion
from mmcds.explain.boilerplate import is_boilerplate
from mmcds.explain.summary import summary_html, summary_markdown
from mmcds.explain.wording import display_unit, lab_phrase, plain_reason, pp
from mmcds.fhir.report import report_bundle
from mmcds.records import (
    LAB_COLUMNS,
    Analysis,
    Assessment,
    Encodings,
    EvidenceSpan,
    Explanation,
    FindingScore,
    LabContribution,
    Missing,
    Patient,
    PatientRecord,
)
from mmcds.service.cards import unavailable_card


@pytest.mark.parametrize(
    ("sentence", "finding", "status"),
    [
        ("No acute airspace disease.", "pneumonia", "negated"),
        ("IMPRESSION: No acute airspace disease.", "pneumonia", "negated"),
        ("Right lower lobe consolidation.", "pneumonia", "affirmed"),
        ("Pt denies fever, cough.", None, "negated"),
        ("Pneumonia unlikely.", "pneumonia", "negated"),
        ("No pneumothorax.", "pneumothorax", "negated"),
        ("Mild cardiomegaly, no effusion.", "pleural_effusion", "negated"),
        ("Mild cardiomegaly, no effusion.", "heart_failure", "affirmed"),
        ("Possible small left effusion.", "pleural_effusion", "uncertain"),
        ("Cannot exclude a small apical pneumothorax.", "pneumothorax", "uncertain"),
        ("r/o pneumonia", "pneumonia", "uncertain"),
        ("History of CHF exacerbation.", "heart_failure", "historical"),
        ("Mother with CHF.", "heart_failure", "family"),
        ("No family hx of VTE.", None, "negated"),
        ("Patient denies fever but reports productive cough.", None, "affirmed"),
        ("Temp 38.9 C, productive cough.", None, "affirmed"),
    ],
)
def test_assertion_status_of_a_sentence(sentence: str, finding: str | None, status: str) -> None:
    assert assertion(sentence, finding) == status


@pytest.mark.parametrize(
    ("text", "section", "boiler"),
    [
        ("PHYSICAL EXAM:", None, True),
        ("LABS: reviewed.", "laboratory data", True),
        ("Labs reviewed", None, True),
        ("ALLERGIES: NKDA", "allergies", True),
        ("ALLERGIES: PCN (rash)", None, True),
        ("NKDA", None, True),
        ("FAMILY HISTORY: Non-contributory.", "family history", True),
        ("Exam unchanged from prior.", None, False),  # says the exam did not change: clinical
        (
            "ATTESTATION: I have personally seen and examined the patient, reviewed the nursing "
            "triage note, vital signs, available laboratory results and prior records in the EHR.",
            None,
            True,
        ),
        ("Return precautions were reviewed.", None, True),
        ("This note was prepared in part with voice recognition software.", None, True),
        ("--- Admission note (copied) ---", None, True),
        ("(copied forward from prior note)", None, True),
        ("All other systems reviewed and negative except as noted in the HPI.", None, True),
        ("", None, True),
        ("IMPRESSION: Right lower lobe consolidation.", "impression", False),
        ("No acute airspace disease.", "impression", False),
        ("Crackles at the right base.", "physical examination", False),
        ("CXR reviewed: new RLL opacity.", None, False),  # "reviewed" with a finding is kept
        ("Temp 38.9 C, productive cough.", None, False),
        ("# Chronic conditions: cont home meds", "assessment and plan", True),
        ("- Chronic problems: will continue home medications.", None, True),
        ("Continue home meds.", None, True),
        ("# Pneumonia: continue ceftriaxone.", "assessment and plan", False),  # names the drug
        ("# Heart failure: resume home meds.", None, False),  # under a problem's own header
        ("Dispo: continue inpatient care.", "assessment and plan", True),
        ("Disposition: home", None, True),
        ("Dispo: ICU for hypoxia on BiPAP.", None, False),  # says why: kept
    ],
)
def test_boilerplate_is_told_from_clinical_sentences(
    text: str, section: str | None, boiler: bool
) -> None:
    assert is_boilerplate(text, section=section) is boiler


def _lab(lab: str, value: float | None, unit: str | None, lo: float, hi: float, c: float):
    when = datetime(2026, 1, 2, 8, tzinfo=UTC) if value is not None else None
    return LabContribution("pneumonia", lab, value, unit, when, lo, hi, c)


def test_labs_say_value_in_clinical_units_state_and_direction() -> None:
    # the case: a normal temperature read "+9 points" and "37.5 Cel"
    temp = _lab("temperature", 37.5, "Cel", 36.1, 37.8, 0.09)
    assert lab_phrase(temp) == "Temperature 37.5 °C, normal (ref 36.1–37.8 °C) → raises, +9 pp"
    crp = _lab("crp", 130.0, "mg/L", 0.0, 5.0, 0.214)
    assert lab_phrase(crp) == "CRP 130 mg/L, high (ref 0–5 mg/L) → raises, +21 pp"
    spo2 = _lab("spo2", 88.0, "%", 95.0, 100.0, -0.031)
    assert lab_phrase(spo2) == "SpO2 88%, low (ref 95–100%) → lowers, −3 pp"
    assert lab_phrase(_lab("wbc", None, None, 4, 11, 0.0)).startswith("WBC not measured")
    assert display_unit("10*3/uL") == "×10³/µL" and display_unit("mg/L") == "mg/L"
    assert (pp(-0.001), pp(0.0), pp(0.126), pp(-0.3)) == ("+0 pp", "+0 pp", "+13 pp", "−30 pp")


PACS_404 = (
    "image 1.2.826.0.1.3680043.8.498.1 unavailable: PACS GET studies/1.2.3/series/4.5/instances/"
    '1.2.826.0.1.3680043.8.498.1 failed with 404: {\n  "HttpError" : "Not Found",\n  '
    '"HttpStatus" : 404,\n  "Message" : "Unknown resource",\n  "Method" : "GET"\n}'
)


def test_upstream_errors_are_one_plain_line() -> None:
    assert plain_reason(Missing("image", PACS_404, "ImagingStudy/s1")) == (
        "image not available from the PACS"
    )
    fhir_down = "vital-signs results unavailable: FHIR server error 503 on GET http://x/Observation"
    assert plain_reason(Missing("labs", fhir_down)) == "labs not available from the FHIR server"
    odd = Missing("text", 'DocumentReference/d1: attachment {"weird": true} could not be read')
    line = plain_reason(odd)
    assert "{" not in line and "\n" not in line and line.startswith("DocumentReference/d1")
    kept = "only the first 20 notes were read (MMCDS_MAX_NOTES)"
    assert plain_reason(Missing("text", kept)) == kept
    down = (
        'FHIR GET http://127.0.0.1:1/fhir/R4/Patient/p1 failed with 404: {"resourceType": '
        '"OperationOutcome", "issue": [{"severity": "error"}]}'
    )
    card = unavailable_card(down, "http://x/model-card")
    assert card["detail"].startswith(
        "The decision-support service could not analyse this patient: FHIR GET."
    )
    assert "{" not in card["detail"] and "OperationOutcome" not in card["detail"]


def _flagged_analysis(missing: list[Missing]) -> Analysis:
    record = PatientRecord(
        patient=Patient(id="p1"), labs=pd.DataFrame(columns=LAB_COLUMNS), missing=missing
    )
    scores = [
        FindingScore("pneumonia", 0.7, 0.3, 0.8),  # warning: detailed on the card
        FindingScore("heart_failure", 0.1, 0.3, 0.8),
    ]
    assessment = Assessment(scores, "mmcds-fusion", "v1", True, ["text", "labs"])
    return Analysis(record, Encodings(), assessment)


def test_card_and_report_say_direction_assertion_and_plain_errors() -> None:
    analysis = _flagged_analysis([Missing("image", PACS_404, "ImagingStudy/s1")])
    note = "DocumentReference/n1"
    explanation = Explanation(
        analysis_id=analysis.identifier,
        evidence=[
            EvidenceSpan("pneumonia", note, "hpi", 0, 28, "Productive cough and fevers.", 0.4),
            EvidenceSpan(
                "pneumonia",
                note,
                "impression",
                40,
                66,
                "No acute airspace disease.",
                -0.2,
                direction="argues_against",
                assertion="negated",
            ),
        ],
        labs=[_lab("temperature", 37.5, "Cel", 36.1, 37.8, 0.09)],
    )
    detail = summary_markdown(analysis, explanation)
    assert (
        "- Notes: supports: “Productive cough and fevers.”; "
        "argues against: “No acute airspace disease.” (negated)" in detail
    )
    assert "- Labs: Temperature 37.5 °C, normal (ref 36.1–37.8 °C) → raises, +9 pp" in detail
    assert "pp = percentage points of probability" in detail  # the unit is defined on the card
    assert "- imaging: image not available from the PACS" in detail
    for text in (detail, summary_html(analysis, explanation)):
        assert "Cel" not in text and "points)" not in text
        assert "HttpError" not in text and "{" not in text
    explanation.summary_html = summary_html(analysis, explanation)  # as the explain stage does
    bundle = report_bundle(analysis, explanation)
    report = next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    shown = base64.b64decode(report["presentedForm"][0]["data"]).decode()
    assert "argues against: “No acute airspace disease.” (negated)" in shown
    assert "image not available from the PACS" in shown and "HttpError" not in shown
    assert "HttpError" not in report["conclusion"]
