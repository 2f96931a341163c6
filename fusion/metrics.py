"""Binary metrics with bootstrap confidence intervals (numpy only, vectorised where it pays).

A label below 0 (``mmcds.fusion.data.UNKNOWN``: uncertain, left out by ``--uncertain ignore``)
is unknown: every figure here leaves that patient out of that finding, never counts it as a
negative.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score

N_BINS = 10


def known(y: np.ndarray, *scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """``y`` and ``scores`` restricted to the patients whose label is known (0 or 1)."""
    y = np.asarray(y)
    keep = y >= 0
    if keep.all():
        return (y, *(np.asarray(s) for s in scores))
    return (y[keep], *(np.asarray(s)[keep] for s in scores))


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUROC with ties counted half; NaN when a class is absent."""
    y, p = known(y, p)
    y = y == 1
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(y: np.ndarray, p: np.ndarray) -> float:
    y, p = known(y, p)
    return float(average_precision_score(y, p)) if 0 < np.sum(y) < len(y) else float("nan")


def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width probability bin of each prediction; 1.0 falls in the last bin."""
    return np.clip((p * bins).astype(int), 0, bins - 1)


def ece(y: np.ndarray, p: np.ndarray, bins: int = N_BINS) -> float:
    """Expected calibration error over equal-width probability bins."""
    y, p = known(y, p)
    y, p = np.asarray(y, float), np.asarray(p, float)
    if len(y) == 0:
        return float("nan")
    which = _bin_index(p, bins)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.sum() * abs(p[sel].mean() - y[sel].mean())
    return float(total / len(y))


def ece_if_calibrated(
    p: np.ndarray, draws: int = 1000, seed: int = 0, bins: int = N_BINS
) -> dict[str, float | None]:
    """The ECE a perfectly calibrated model with these very probabilities would show on this
    many patients: labels drawn from ``p`` itself, ``draws`` times. Binned ECE is biased upward
    on small samples (200 patients with mid-range probabilities: about 0.05), so an observed ECE
    inside this range is no evidence of miscalibration."""
    p = np.asarray(p, float)
    if len(p) == 0:
        return {"mean": None, "p95": None}
    which = _bin_index(p, bins)
    onehot = np.eye(bins)[which]  # (n, bins)
    y = np.random.default_rng(seed).random((draws, len(p))) < p
    gaps = np.abs((p - y) @ onehot).sum(axis=1) / len(p)  # per draw: sum_b |sum_b (p - y)| / n
    return {"mean": _r(float(gaps.mean())), "p95": _r(float(np.percentile(gaps, 95)))}


def reliability(y: np.ndarray, p: np.ndarray, bins: int = N_BINS) -> list[dict[str, float]]:
    y, p = known(y, p)
    y, p = np.asarray(y, float), np.asarray(p, float)
    which = _bin_index(p, bins)
    out = []
    for b in range(bins):
        sel = which == b
        if sel.any():
            out.append(
                {
                    "bin": b,
                    "mean_predicted": float(p[sel].mean()),
                    "observed": float(y[sel].mean()),
                    "n": int(sel.sum()),
                }
            )
    return out


def brier(y: np.ndarray, p: np.ndarray) -> float:
    y, p = known(y, p)
    return float(np.mean((np.asarray(p, float) - np.asarray(y, float)) ** 2)) if len(y) else 0.0


def at_threshold(y: np.ndarray, p: np.ndarray, t: float) -> dict[str, float | None]:
    y, p = known(y, p)
    y = y == 1
    flag = np.asarray(p) >= t
    pos, neg = int(y.sum()), int((~y).sum())
    return {
        "threshold": float(t),
        "sensitivity": float((flag & y).sum() / pos) if pos else None,
        "specificity": float((~flag & ~y).sum() / neg) if neg else None,
        "flagged": int(flag.sum()),
    }


def roc_points(y: np.ndarray, p: np.ndarray, max_points: int = 60) -> list[list[float]]:
    """[fpr, tpr] pairs for plotting, thinned to at most ``max_points``."""
    y, p = known(y, p)
    y = y == 1
    if y.all() or not y.any():
        return []
    order = np.argsort(-np.asarray(p), kind="stable")
    tpr = np.concatenate([[0.0], np.cumsum(y[order]) / y.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(~y[order]) / (~y).sum()])
    keep = np.unique(np.linspace(0, len(tpr) - 1, max_points).astype(int))
    return [[round(float(fpr[i]), 4), round(float(tpr[i]), 4)] for i in keep]


def bootstrap_index(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def boot_auroc(y: np.ndarray, p: np.ndarray, index: np.ndarray) -> np.ndarray:
    """AUROC per bootstrap resample (NaN where a resample lacks a class)."""
    return np.array([auroc(y[i], p[i]) for i in index])


def ci(samples: np.ndarray, level: float = 0.95) -> list[float] | None:
    s = samples[np.isfinite(samples)]
    if len(s) < 10:
        return None
    lo, hi = np.percentile(s, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return [round(float(lo), 4), round(float(hi), 4)]


def binary_metrics(
    y: np.ndarray,
    p: np.ndarray,
    thresholds: dict[str, float],
    index: np.ndarray | None = None,
) -> dict[str, Any]:
    """AUROC (+ bootstrap CI when ``index`` is given), AUPRC, ECE, Brier, operating points.
    ``n`` and ``positives`` count the patients whose label is known."""
    y = np.asarray(y).astype(int)
    out: dict[str, Any] = {
        "n": int((y >= 0).sum()),
        "positives": int((y == 1).sum()),
        "auroc": _r(auroc(y, p)),
        "auprc": _r(auprc(y, p)),
        "ece": _r(ece(y, p)),
        "brier": _r(brier(y, p)),
        "operating_points": {k: at_threshold(y, p, t) for k, t in thresholds.items()},
    }
    if index is not None:
        out["auroc_ci"] = ci(boot_auroc(y, p, index))
        out["ece_if_calibrated"] = ece_if_calibrated(known(y, p)[1])
    return out


def paired_auroc_test(
    y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, index: np.ndarray
) -> dict[str, Any]:
    """Paired bootstrap of AUROC(a) - AUROC(b) on the same resamples; one-sided p for a <= b."""
    diff = boot_auroc(y, p_a, index) - boot_auroc(y, p_b, index)
    diff = diff[np.isfinite(diff)]
    return {
        "difference": _r(auroc(y, p_a) - auroc(y, p_b)),
        "difference_ci": ci(diff),
        "p_value": _r(float((np.sum(diff <= 0) + 1) / (len(diff) + 1))) if len(diff) else None,
        "resamples": int(len(diff)),
    }


def _r(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 4)
