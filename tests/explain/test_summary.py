"""Words match numbers, and findings held back say why, on the card and in the report."""

from __future__ import annotations

import pandas as pd
from fhir.resources.R4B.observation import Observation

from mmcds.explain.summary import card_words, summary_line, summary_markdown
from mmcds.fhir.report import report_bundle
from mmcds.records import (
    LAB_COLUMNS,
    Analysis,
    Assessment,
    Encodings,
    Explanation,
    FindingScore,
    Patient,
    PatientRecord,
)


def test_words_are_monotone_in_probability_across_findings_on_one_card() -> None:
    # A rare finding's high-specificity point can sit below a common finding's screening point:
    # the demo once read "Pneumothorax: high probability (18%)" beside "possible (38%)".
    ptx = FindingScore("pneumothorax", 0.18, 0.05, 0.15)  # critical
    eff = FindingScore("pleural_effusion", 0.38, 0.30, 0.80)  # warning
    words = card_words([ptx, eff])
    assert words["pleural_effusion"] == "possible"
    assert not words["pneumothorax"].startswith("high probability")
    assert "critical alert" in words["pneumothorax"]  # the alert is still said, in words
    strong = FindingScore("pneumonia", 0.9, 0.3, 0.8)  # critical and likeliest: stays "high"
    assert card_words([strong, ptx, eff])["pneumonia"] == "high probability"


def _analysis(scores: list[FindingScore]) -> Analysis:
    record = PatientRecord(patient=Patient(id="p1"), labs=pd.DataFrame(columns=LAB_COLUMNS))
    assessment = Assessment(scores, "mmcds-fusion", "v1", True, ["labs"], subset="labs")
    return Analysis(record, Encodings(), assessment)


def test_held_back_findings_are_shown_with_their_reason_and_absent_in_the_report() -> None:
    reason = "insufficient inputs to assess: labs alone was never validated"
    analysis = _analysis(
        [
            FindingScore("pneumonia", 0.7, 1.01, 1.01, "insufficient_inputs", reason),
            FindingScore("heart_failure", 0.1, 0.3, 0.8),
        ]
    )
    assert analysis.assessment.level == "info"  # a held-back 70% never alarms
    assert "1 not assessed" in summary_line(analysis)
    explanation = Explanation(analysis_id=analysis.identifier)
    detail = summary_markdown(analysis, explanation)
    assert "Not assessed" in detail and reason in detail
    bundle = report_bundle(analysis, explanation)
    observations = [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
    ]
    held = next(o for o in observations if "pneumonia" in o["code"]["text"].lower())
    Observation.model_validate(held)
    assert "valueQuantity" not in held and held["dataAbsentReason"]["coding"][0]["code"]
    assert held["note"][0]["text"] == reason
    kept = next(o for o in observations if "heart failure" in o["code"]["text"].lower())
    assert kept["valueQuantity"]["value"] == 0.1
