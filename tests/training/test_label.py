"""``mmcds label``: reports + a site's labels CSV -> a cohort, with the uncertain policy."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mmcds.findings import UnknownFinding
from mmcds.training.dataset import cohort_findings, iter_examples
from mmcds.training.label import label_reports

REPORTS = {
    "p1": "FINDINGS: Enlarged cardiac silhouette.\nIMPRESSION: Cardiomegaly.",
    "p2": "FINDINGS: Possible left basal atelectasis.\nIMPRESSION: Atelectasis possible.",
    "p3": "FINDINGS: Clear lungs.\nIMPRESSION: No acute disease.",
}


def _site(tmp_path: Path, columns: dict[str, list]) -> tuple[Path, Path]:
    reports = tmp_path / "reports"
    reports.mkdir()
    for key, text in REPORTS.items():
        (reports / f"{key}.txt").write_text(text)
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"patient_key": list(REPORTS), **columns}).to_csv(csv, index=False)
    return reports, csv


@pytest.mark.parametrize(
    ("policy", "count", "atelectasis"),
    [("ignore", "uncertain_labels_masked", [0, -1, 0]),
     ("zeros", "uncertain_labels_mapped", [0, 0, 0]),
     ("ones", "uncertain_labels_mapped", [0, 1, 0])],
)  # fmt: skip
def test_uncertain_policy(tmp_path: Path, policy: str, count: str, atelectasis: list) -> None:
    reports, csv = _site(tmp_path, {"cardiomegaly": [1, 0, None], "atelectasis": [None, -1, 0]})
    counts = label_reports(reports, csv, tmp_path / "cohort", policy)  # type: ignore[arg-type]
    assert counts == {"patients": 3, count: 1}  # every patient kept, whatever the policy
    assert [f.name for f in cohort_findings(tmp_path / "cohort")] == ["cardiomegaly", "atelectasis"]
    examples = list(iter_examples(tmp_path / "cohort", None, ["cardiomegaly", "atelectasis"]))
    assert [ex.key for ex in examples] == ["p1", "p2", "p3"]
    # under ignore only p2's atelectasis is unknown; its cardiomegaly label still teaches
    assert [ex.labels["cardiomegaly"] for ex in examples] == [1, 0, 0]
    assert [ex.labels["atelectasis"] for ex in examples] == atelectasis
    assert all(len(ex.record.notes) == 1 and not ex.record.images for ex in examples)
    assert "Cardiomegaly" in examples[0].record.notes[0].text


def test_unknown_column_is_refused(tmp_path: Path) -> None:
    reports, csv = _site(tmp_path, {"cardiomegaly": [1, 0, 0], "chest_pain": [0, 1, 0]})
    with pytest.raises(UnknownFinding, match="chest_pain"):
        label_reports(reports, csv, tmp_path / "cohort")
