"""Evaluation of a trained fusion model on an encoded set: the figures of ``metrics.json``.

Per finding: AUROC with a bootstrap 95% CI, AUPRC, ECE, Brier and sensitivity/specificity at the
model's operating points -- for all modalities and every modality subset (a subset masks the
others out, exactly as a missing modality is masked in service), per site and per subgroup; a
paired bootstrap of fusion against the best single modality; the shift between sites with global
and with per-site calibration.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

from mmcds.fusion.calibrate import Calibration
from mmcds.fusion.data import EncodedSet
from mmcds.fusion.metrics import (
    binary_metrics,
    bootstrap_index,
    ci,
    ece,
    known,
    paired_auroc_test,
    reliability,
    roc_points,
)
from mmcds.fusion.model import FusionModel
from mmcds.fusion.train import predict_logits
from mmcds.records import MODALITIES

ALL = "+".join(MODALITIES)


def subsets() -> list[tuple[str, ...]]:
    """Every non-empty modality subset, largest first: all, then pairs, then singles."""
    out: list[tuple[str, ...]] = []
    for size in range(len(MODALITIES), 0, -1):
        out.extend(combinations(MODALITIES, size))
    return out


def _name(subset: tuple[str, ...]) -> str:
    return "+".join(subset)


def _per_finding(
    ds: EncodedSet, probs: np.ndarray, model: FusionModel, rows: np.ndarray, n_boot: int, seed: int
) -> dict[str, Any]:
    cfg = model.config
    index = bootstrap_index(int(rows.sum()), n_boot, seed) if n_boot else None
    out = {}
    for j, f in enumerate(cfg.findings):
        thresholds = {
            "warning": cfg.warning_threshold.get(f, 1.01),
            "critical": cfg.critical_threshold.get(f, 1.01),
        }
        out[f] = binary_metrics(ds.labels[rows, j], probs[rows, j], thresholds, index)
    return out


def _groups(values: list[str | None]) -> dict[str, np.ndarray]:
    arr = np.array([v if v is not None else "unknown" for v in values])
    return {str(g): arr == g for g in sorted(set(arr.tolist()))}


def evaluate(
    model: FusionModel, ds: EncodedSet, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    cfg = model.config
    cal = Calibration.from_json(cfg.calibration, cfg.findings)
    everyone = np.ones(len(ds), dtype=bool)
    logits = {
        _name(s): predict_logits(model, ds.encodings, [m for m in MODALITIES if m not in s])
        for s in subsets()
    }
    probs = {k: cal.apply(z, ds.sites) for k, z in logits.items()}
    present = {m: int(sum(m in e.by_modality for e in ds.encodings)) for m in MODALITIES}
    result: dict[str, Any] = {
        "model": {"version": cfg.version, "encoders": cfg.encoder_ids},
        "data": {
            "patients": len(ds),
            "modalities_present": present,
            "sites": {k: int(v.sum()) for k, v in _groups(ds.sites).items()},
            "prevalence": {
                f: round(float(known(ds.labels[:, j])[0].mean()), 4)
                for j, f in enumerate(cfg.findings)
            },
        },
        "findings": list(cfg.findings),
        "bootstrap": {"resamples": n_boot, "seed": seed},
        "subsets": {
            k: _per_finding(ds, p, model, everyone, n_boot, seed) for k, p in probs.items()
        },
    }
    p_all = probs[ALL]
    result["sites"] = {
        g: _per_finding(ds, p_all, model, rows, n_boot, seed)
        for g, rows in _groups(ds.sites).items()
    }
    result["subgroups"] = {
        name: {
            g: _per_finding(ds, p_all, model, rows, n_boot, seed)
            for g, rows in _groups(values).items()
        }
        for name, values in (("sex", ds.sex), ("age_band", ds.age_band))
    }
    result["fusion_vs_best_single"] = _fusion_vs_single(ds, probs, cfg.findings, n_boot, seed)
    result["missing_one"] = {
        f: {
            f"without_{m}": result["subsets"][_name(tuple(x for x in MODALITIES if x != m))][f][
                "auroc"
            ]
            for m in MODALITIES
        }
        | {"all": result["subsets"][ALL][f]["auroc"]}
        for f in cfg.findings
    }
    result["site_shift"], result["site_shift_summary"] = _site_shift(
        ds, logits[ALL], cal, n_boot, seed
    )
    result["calibration"] = {
        "method": cal.method,
        "ece_uncalibrated": {
            f: round(ece(ds.labels[:, j], 1 / (1 + np.exp(-logits[ALL][:, j]))), 4)
            for j, f in enumerate(cfg.findings)
        },
        "ece_global": {
            f: round(ece(ds.labels[:, j], cal.apply(logits[ALL], ds.sites, False)[:, j]), 4)
            for j, f in enumerate(cfg.findings)
        },
        "ece_per_site": {
            f: round(ece(ds.labels[:, j], p_all[:, j]), 4) for j, f in enumerate(cfg.findings)
        },
    }
    result["plots"] = {
        "roc": {
            f: {k: roc_points(ds.labels[:, j], p[:, j]) for k, p in probs.items()}
            for j, f in enumerate(cfg.findings)
        },
        "reliability": {
            f: reliability(ds.labels[:, j], p_all[:, j]) for j, f in enumerate(cfg.findings)
        },
    }
    return result


def _fusion_vs_single(
    ds: EncodedSet, probs: dict[str, np.ndarray], findings: list[str], n_boot: int, seed: int
) -> dict[str, Any]:
    index = bootstrap_index(len(ds), max(n_boot, 200), seed + 1)
    out = {}
    for j, f in enumerate(findings):
        singles = {
            m: binary_metrics(ds.labels[:, j], probs[m][:, j], {})["auroc"] for m in MODALITIES
        }
        ranked = [m for m in MODALITIES if singles[m] is not None]
        if not ranked:
            continue
        best = max(ranked, key=lambda m: singles[m] or 0.0)
        test = paired_auroc_test(ds.labels[:, j], probs[ALL][:, j], probs[best][:, j], index)
        out[f] = {"best_single": best, "single_aurocs": singles, **test}
    return out


def _site_shift(
    ds: EncodedSet, logits: np.ndarray, cal: Calibration, n_boot: int = 0, seed: int = 0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per site: AUROC and ECE with the global calibration and with the site's own; with
    ``n_boot``, a bootstrap 95% CI (patients resampled within each site) of the per-site gap
    minus the global gap, so a narrower gap can be told from noise. The summary is the same
    over the mean gap of all findings: the resamples are shared across findings, so the mean's
    interval is paired too."""
    groups = {g: r for g, r in _groups(ds.sites).items() if g != "unknown"}
    if len(groups) < 2:
        return {}, {}
    changes = []
    glob = cal.apply(logits, ds.sites, per_site=False)
    local = cal.apply(logits, ds.sites, per_site=True)
    out: dict[str, Any] = {}
    for j, f in enumerate(cal.findings):
        row: dict[str, Any] = {"global": {}, "per_site": {}, "auroc": {}, "prevalence": {}}
        for g, rows in groups.items():
            y = ds.labels[rows, j]
            row["global"][g] = round(ece(y, glob[rows, j]), 4)
            row["per_site"][g] = round(ece(y, local[rows, j]), 4)
            row["auroc"][g] = binary_metrics(y, local[rows, j], {})["auroc"]
            row["prevalence"][g] = round(float(known(y)[0].mean()), 4)
        for k in ("global", "per_site"):
            vals = list(row[k].values())
            row[f"{k}_gap"] = round(max(vals) - min(vals), 4)
            row[f"{k}_mean"] = round(float(np.mean(vals)), 4)
        if n_boot:
            change = _gap_change(ds.labels[:, j], glob[:, j], local[:, j], groups, n_boot, seed)
            row["gap_change"] = round(row["per_site_gap"] - row["global_gap"], 4)
            row["gap_change_ci"] = ci(change)
            changes.append(change)
        out[f] = row
    summary: dict[str, Any] = {
        f"mean_{k}_gap": round(float(np.mean([r[f"{k}_gap"] for r in out.values()])), 4)
        for k in ("global", "per_site")
    }
    if changes:
        summary["mean_gap_change"] = round(
            summary["mean_per_site_gap"] - summary["mean_global_gap"], 4
        )
        summary["mean_gap_change_ci"] = ci(np.mean(changes, axis=0))
    return out, summary


def _gap_change(
    y: np.ndarray,
    glob: np.ndarray,
    local: np.ndarray,
    groups: dict[str, np.ndarray],
    n_boot: int,
    seed: int,
) -> np.ndarray:
    """Per resample: (ECE gap between sites, per-site calibration) - (gap, global calibration).
    The same resampled patients serve both calibrations (paired)."""
    per_site = []
    for k, rows in enumerate(groups.values()):
        where = np.flatnonzero(rows)
        index = where[bootstrap_index(len(where), n_boot, seed + 7 + k)]
        per_site.append(
            (
                np.array([ece(y[i], glob[i]) for i in index]),
                np.array([ece(y[i], local[i]) for i in index]),
            )
        )
    g = np.stack([p[0] for p in per_site])
    loc = np.stack([p[1] for p in per_site])
    return (loc.max(0) - loc.min(0)) - (g.max(0) - g.min(0))
