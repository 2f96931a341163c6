"""The TF-IDF + logistic regression baseline of ``mmcds evaluate --baseline tfidf``."""

from __future__ import annotations

import numpy as np

from mmcds.fusion.data import UNKNOWN
from mmcds.training.baseline import compare, fit_predict, verdict

WORDS = ["cough", "fever", "stable", "walking", "eating", "sleeping", "reviewed", "plan"]


def _notes(y: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Filler notes; patients with the finding (y=1) mention consolidation, most others deny it."""
    out = []
    for label in y:
        words = list(rng.choice(WORDS, 12))
        words += ["right", "lower", "lobe", "consolidation"] if label else ["no", "consolidation"]
        out.append(" ".join(rng.permutation(words)))
    return out


def test_baseline_learns_from_the_training_notes_and_scores_others() -> None:
    rng = np.random.default_rng(0)
    y_train = rng.integers(0, 2, (120, 2)).astype(float)
    y_test = rng.integers(0, 2, (60, 2)).astype(float)
    y_train[:10, 1] = UNKNOWN  # left out of finding 1's fit, not read as negatives
    probs, info = fit_predict(_notes(y_train[:, 0], rng), y_train, _notes(y_test[:, 0], rng))
    assert probs.shape == (60, 2)
    assert info["fitted"][0]["train_patients"] == 120
    assert info["fitted"][1]["train_patients"] == 110
    # finding 0 is written in the notes; finding 1 is noise
    random_model = rng.random((60, 2))
    rows = compare(y_test, {"model": random_model}, probs, ["a", "b"], n_boot=200, seed=0)
    assert rows["a"]["baseline_auroc"] == 1.0
    assert 0.2 < rows["b"]["baseline_auroc"] < 0.8
    assert rows["a"]["model_verdict"] == "loses to the baseline"
    assert rows["a"]["model_minus_baseline_ci"][1] < 0
    assert rows["b"]["model_verdict"].startswith("matches")


def test_one_class_in_training_is_not_fitted() -> None:
    y = np.zeros((20, 1))
    probs, info = fit_predict(["no consolidation"] * 20, y, ["consolidation"])
    assert np.isnan(probs).all()
    assert info["fitted"][0]["skipped"]


def test_verdict_reads_the_paired_interval() -> None:
    assert verdict([0.01, 0.05]) == "beats the baseline"
    assert verdict([-0.05, -0.01]) == "loses to the baseline"
    assert verdict([-0.02, 0.03]).startswith("matches")
    assert verdict(None) == "undetermined"
