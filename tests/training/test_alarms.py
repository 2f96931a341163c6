"""``mmcds evaluate``'s decision rates (issue 21): what the service said to each patient, counted
per finding, and whether the operating points' promises hold on the scored patients."""

from __future__ import annotations

import numpy as np
import pytest

from mmcds.records import Assessment, FindingScore
from mmcds.training.alarms import alarm_lines, decision_rates

WARN, CRIT = 0.3, 0.7


def _patient(p: float, status: str = "assessed") -> Assessment:
    score = FindingScore("pneumonia", p, WARN, CRIT, status)  # type: ignore[arg-type]
    return Assessment([score], "m", "v", True, ["labs"])


def test_rates_count_alerts_abstentions_and_accuracy_on_the_assessed() -> None:
    # probability, label, status: two positives and one negative alert, one critical false
    # alarm, one abstention (a positive the model never judged)
    rows = [
        (0.9, 1, "assessed"),  # critical, true
        (0.5, 1, "assessed"),  # warning, true
        (0.1, 1, "assessed"),  # missed
        (0.8, 0, "assessed"),  # critical, false
        (0.4, 0, "assessed"),  # warning, false
        (0.1, 0, "assessed"),
        (0.2, 0, "assessed"),
        (0.95, 1, "abstained"),  # would be critical, but abstained: never an alert
    ]
    assessments = [_patient(p, s) for p, _, s in rows]
    labels = np.array([[y] for _, y, _ in rows], float)
    r = decision_rates(assessments, labels, 0)
    assert r["n"] == 8
    assert r["alarm_rate"] == pytest.approx(4 / 8)
    assert r["critical_rate"] == pytest.approx(2 / 8)
    assert r["abstention_rate"] == r["not_assessed_rate"] == pytest.approx(1 / 8)
    # on the 7 assessed: 3 positives (2 alerted), 4 negatives (2 alerted, 1 critical)
    assert r["alarm_sensitivity"] == pytest.approx(2 / 3)
    assert r["alarm_specificity"] == pytest.approx(2 / 4)
    assert r["critical_sensitivity"] == pytest.approx(1 / 3)
    assert r["critical_specificity"] == pytest.approx(3 / 4)
    # AUROC on the assessed only: of 12 positive/negative pairs, 7 ordered right and one tie
    assert r["auroc_assessed"] == pytest.approx(7.5 / 12)
    line = alarm_lines({"labs": {"pneumonia": r}})[1]
    assert "alarm 0.50 (0.67/0.50)" in line and "critical 0.25 (0.75)" in line


def test_rates_without_positives_say_so() -> None:
    r = decision_rates([_patient(0.5)], np.array([[0.0]]), 0)
    assert r["alarm_sensitivity"] is None and r["auroc_assessed"] is None
    assert r["alarm_specificity"] == 0.0
    assert "n/a" in alarm_lines({"labs": {"pneumonia": r}})[1]
