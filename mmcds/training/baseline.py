"""``mmcds evaluate --baseline tfidf``: the text path against TF-IDF + logistic regression.

A model that reads notes must at least match the plainest text classifier fitted on the same
patients. Per finding, TF-IDF (word 1-2-grams, sublinear tf) over all of a patient's notes and an
L2 logistic regression whose strength is chosen by 5-fold cross-validation inside the *training*
split (the model's own training patients, ``config.training["split"]["train"]``), scored on the
very patients ``mmcds evaluate`` scores. The figures are paired: the same bootstrap resamples give
the CI of each AUROC and of the difference (model minus baseline), so "the model loses" means
the difference's CI lies below 0, not that two separate intervals happen to overlap.

Patients without notes get an empty text (the baseline then says what it says for "nothing").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.pipeline import Pipeline, make_pipeline

from mmcds.errors import InputRejected
from mmcds.fusion import lexical
from mmcds.fusion.calibrate import Calibration
from mmcds.fusion.data import EncodedSet
from mmcds.fusion.metrics import auroc, boot_auroc, bootstrap_index, ci, paired_auroc_test
from mmcds.fusion.model import FusionModel
from mmcds.fusion.train import predict_logits
from mmcds.records import MODALITIES, PatientRecord
from mmcds.training.dataset import Example, iter_examples

NAME = "tfidf"
METHOD = lexical.METHOD


def note_text(record: PatientRecord) -> str:
    """Everything the patient's notes say, in one document."""
    return lexical.note_text(record.notes)


def _classifier(y: np.ndarray) -> Pipeline:
    """The same recipe as the model's lexical path, but fitted here per finding, through
    scikit-learn's own pipeline: the baseline stands apart from the model it is compared with."""
    return make_pipeline(lexical.vectoriser(), lexical.regression(y))


def fit_predict(
    train_texts: Sequence[str], train_labels: np.ndarray, texts: Sequence[str]
) -> tuple[np.ndarray, dict[str, Any]]:
    """Per finding (columns of ``train_labels``, 1/0, anything else unknown and left out): the
    baseline's probability for each of ``texts`` (N, F), and what was fitted (patients, C)."""
    n_findings = train_labels.shape[1]
    probs = np.full((len(texts), n_findings), np.nan)
    fitted: list[dict[str, Any]] = []
    for j in range(n_findings):
        known = np.isin(train_labels[:, j], (0, 1))
        y = train_labels[known, j].astype(int)
        info: dict[str, Any] = {"train_patients": int(known.sum()), "train_positives": int(y.sum())}
        if y.min(initial=1) == y.max(initial=0):  # one class (or none): nothing to learn
            info["skipped"] = "one class only in the training split"
        else:
            clf = _classifier(y).fit([t for t, k in zip(train_texts, known, strict=True) if k], y)
            probs[:, j] = clf.predict_proba(list(texts))[:, 1]
            lr = clf[-1]
            info["C"] = float(lr.C_ if isinstance(lr, LogisticRegressionCV) else lr.C)
        fitted.append(info)
    return probs, {"fitted": fitted}


def compare(
    labels: np.ndarray,
    model_scores: dict[str, np.ndarray],
    baseline: np.ndarray,
    findings: Sequence[str],
    n_boot: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Per finding: the baseline's AUROC (+ bootstrap 95% CI) beside each model score's, and the
    paired difference model minus baseline with its CI. ``model_scores`` maps a name ("model",
    "model_text_only") to its probabilities (N, F)."""
    out: dict[str, dict[str, Any]] = {}
    for j, f in enumerate(findings):
        known = np.isin(labels[:, j], (0, 1))  # an uncertain label is left out of its finding
        y, b = labels[known, j].astype(int), baseline[known, j]
        row: dict[str, Any] = {"n": int(len(y)), "positives": int(y.sum())}
        if not len(y) or not np.isfinite(b).all():
            row["baseline_auroc"] = None
            out[f] = row
            continue
        # The verdict needs a paired CI, so the comparison resamples even where evaluate's own
        # bootstrap is off (``--bootstrap 0``); the number used is recorded beside it.
        row["resamples"] = max(n_boot, 200)
        index = bootstrap_index(len(y), row["resamples"], seed)
        row["baseline_auroc"] = _r(auroc(y, b))
        row["baseline_auroc_ci"] = ci(boot_auroc(y, b, index))
        for name, scores in model_scores.items():
            z = scores[known, j]
            row[f"{name}_auroc"] = _r(auroc(y, z))
            row[f"{name}_auroc_ci"] = ci(boot_auroc(y, z, index))
            test = paired_auroc_test(y, z, b, index)
            row[f"{name}_minus_baseline"] = test["difference"]
            row[f"{name}_minus_baseline_ci"] = test["difference_ci"]
            row[f"{name}_verdict"] = verdict(test["difference_ci"])
        out[f] = row
    return out


def verdict(difference_ci: list[float] | None) -> str:
    """What the paired CI of (model - baseline) says."""
    if difference_ci is None:
        return "undetermined"
    if difference_ci[1] < 0:
        return "loses to the baseline"
    if difference_ci[0] > 0:
        return "beats the baseline"
    return "matches the baseline (difference CI includes 0)"


def training_examples(model: FusionModel, examples: Sequence[Example]) -> list[Example]:
    """The model's training-split patients: from ``examples`` when they hold them all (the
    evaluated folder is the training cohort), else read from the folder it was trained on."""
    training = model.config.training
    keys = list(training.get("split", {}).get("train", []))
    if not keys:
        raise InputRejected("the model records no training split: the baseline cannot be fitted")
    have = {ex.key: ex for ex in examples}
    if not set(keys) <= set(have):
        source = Path(str(training.get("data", "")))
        if not (source / "labels.csv").is_file():
            raise InputRejected(
                f"the baseline is fitted on the model's training patients, in {source}, which is "
                "not readable here: evaluate on that folder or make it available"
            )
        wanted = set(keys)
        have = {
            ex.key: ex for ex in iter_examples(source, None, model.config.findings)
            if ex.key in wanted
        }  # fmt: skip
    return [have[k] for k in keys]


def baseline_report(
    model: FusionModel,
    examples: Sequence[Example],
    evaluated: Sequence[Example],
    encoded: EncodedSet,
    n_boot: int,
    seed: int = 0,
) -> dict[str, Any]:
    """The TF-IDF baseline fitted on the model's training split and compared, per finding, on
    the ``evaluated`` patients (``encoded``, same order) with the model on all its inputs and,
    when it has more than notes, on its notes alone."""
    findings = model.config.findings
    train = training_examples(model, examples)
    if not any(ex.record.notes for ex in train):
        raise InputRejected(
            "the model's training patients have no notes: a text baseline has nothing to read"
        )
    y_train = np.array([[ex.labels.get(f, -1) for f in findings] for ex in train], float)
    texts = [note_text(ex.record) for ex in evaluated]
    probs, fitted = fit_predict([note_text(ex.record) for ex in train], y_train, texts)
    # the model's probabilities as ``evaluate`` scores them (site-aware calibration included)
    cal = Calibration.from_json(model.config.calibration, findings)
    scores = {"model": cal.apply(predict_logits(model, encoded.encodings), encoded.sites)}
    if "text" in model.config.modalities and len(model.config.modalities) > 1:
        others = [m for m in MODALITIES if m != "text"]
        z = predict_logits(model, encoded.encodings, removed=others)
        scores["model_text_only"] = cal.apply(z, encoded.sites)
    rows = compare(encoded.labels, scores, probs, findings, n_boot, seed)
    for f, info in zip(findings, fitted["fitted"], strict=True):
        rows[f].update(info)
    return {
        "name": NAME,
        "method": METHOD,
        "fitted_on": f"the model's training split ({len(train)} patients)",
        "scored_on": f"the evaluated patients ({len(evaluated)})",
        "model_scores": list(scores),
        "findings": rows,
    }


def lines(report: dict[str, Any]) -> list[str]:
    """One printed line per finding."""
    out = [f"baseline {report['name']}: {report['method']}; fitted on {report['fitted_on']}"]
    for f, row in report["findings"].items():
        if row.get("baseline_auroc") is None:
            out.append(f"{f}: baseline not fitted ({row.get('skipped', 'no AUROC')})")
            continue
        text = f"{f}: baseline AUROC {row['baseline_auroc']} CI {row['baseline_auroc_ci']}"
        for name in report["model_scores"]:
            text += (
                f"; {name} {row[f'{name}_auroc']} CI {row[f'{name}_auroc_ci']}, "
                f"difference {row[f'{name}_minus_baseline']} CI "
                f"{row[f'{name}_minus_baseline_ci']} ({row[f'{name}_verdict']})"
            )
        out.append(text)
    return out


def _r(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 4)
