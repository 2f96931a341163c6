"""What the service would have said to each patient: alarm and abstention rates per subset.

``mmcds evaluate`` scores the model's numbers (AUROC, ECE); this scores its *decisions*, through
the service's own ``Pipeline.fuse`` (validation gates, out-of-distribution checks, operating
points). Per subset of inputs (the others masked, as a missing modality is in service) and per
finding: how often it raised ``warning``/``critical``, how often it abstained or was not
assessed, and the AUROC on the patients it did assess.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np

from mmcds.encoders.labs import empty_lab_frame
from mmcds.fusion.data import EncodedSet
from mmcds.fusion.metrics import auroc, known
from mmcds.fusion.pipeline import Pipeline
from mmcds.fusion.validation import mask, subset_key
from mmcds.records import MODALITIES, Assessment, Level, PatientRecord
from mmcds.training.dataset import Example


def _masked_record(record: PatientRecord, keep: set[str]) -> PatientRecord:
    """The record as a patient who brought only ``keep`` would have it."""
    return dataclasses.replace(
        record,
        images=record.images if "image" in keep else [],
        notes=record.notes if "text" in keep else [],
        labs=record.labs if "labs" in keep else empty_lab_frame(),
    )


def _site(record: PatientRecord) -> str | None:
    return next((img.site for img in record.images if img.site), None)


def decision_rates(assessments: Sequence[Assessment], labels: np.ndarray, j: int) -> dict[str, Any]:
    """Finding ``j``'s decision rates over ``assessments`` (one per patient, ``labels`` (N, F))."""
    scores = [a.findings[j] for a in assessments]
    n = len(scores)
    assessed = np.array([s.assessed for s in scores], bool)
    y = labels[:, j]
    p = np.array([s.probability for s in scores])
    kept, p_kept = known(y[assessed], p[assessed])  # an unknown label scores nothing
    both = len(kept) and kept.min() != kept.max()
    levels = np.array([s.level for s in scores], object)
    return {
        "n": n,
        "alarm_rate": sum(s.level != Level.info for s in scores) / n if n else None,
        "critical_rate": sum(s.level == Level.critical for s in scores) / n if n else None,
        "abstention_rate": sum(s.status == "abstained" for s in scores) / n if n else None,
        "not_assessed_rate": float((~assessed).mean()) if n else None,
        "auroc_assessed": float(auroc(kept, p_kept)) if both else None,
        # whether the validation split's promises hold here: on the assessed patients, the
        # sensitivity and specificity of any alert and of a critical one
        **_accuracy(y[assessed], levels[assessed] != Level.info, "alarm"),
        **_accuracy(y[assessed], levels[assessed] == Level.critical, "critical"),
    }


def _accuracy(y: np.ndarray, flagged: np.ndarray, name: str) -> dict[str, float | None]:
    pos, neg = y == 1, y == 0  # an unknown label (-1) is neither
    return {
        f"{name}_sensitivity": float(flagged[pos].mean()) if pos.any() else None,
        f"{name}_specificity": float((~flagged[neg]).mean()) if neg.any() else None,
    }


def alarm_report(pipe: Pipeline, examples: Sequence[Example], encoded: EncodedSet) -> dict:
    """Per subset key and finding, the service's decision rates on these patients."""
    by_key = {ex.key: ex for ex in examples}
    findings = pipe.fusion.config.findings
    out: dict[str, Any] = {}
    for size in range(len(MODALITIES), 0, -1):
        for subset in combinations(MODALITIES, size):
            keep: set[str] = set(subset)
            rows = [i for i, e in enumerate(encoded.encodings) if keep <= set(e.present)]
            if not rows:
                continue
            assessments = []
            for i in rows:
                record = _masked_record(by_key[encoded.keys[i]].record, keep)
                assessments.append(
                    pipe.fuse(mask(encoded.encodings[i], keep), _site(record), record)
                )
            labels = encoded.labels[rows]
            out[subset_key(subset)] = {
                f: decision_rates(assessments, labels, j) for j, f in enumerate(findings)
            }
    return out


def alarm_lines(report: dict[str, Any]) -> list[str]:
    """A compact text table for the terminal."""
    lines = [
        "subset / finding: alarm rate (sensitivity/specificity of any alert), critical rate "
        "(its specificity), abstention rate, not assessed, AUROC on assessed"
    ]
    for key, per in report.items():
        for f, r in per.items():
            lines.append(
                f"{key:18s} {f:18s} alarm {r['alarm_rate']:.2f} ({_f(r['alarm_sensitivity'])}/"
                f"{_f(r['alarm_specificity'])})  critical {r['critical_rate']:.2f} "
                f"({_f(r['critical_specificity'])})  abstain {r['abstention_rate']:.2f}  "
                f"not assessed {r['not_assessed_rate']:.2f}  AUROC {_f(r['auroc_assessed'])}"
            )
    return lines


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
