"""Calibration on the validation split and operating points per finding.

A calibrator maps a finding's logit to ``sigmoid(scale * logit + bias)``. ``temperature`` fits
the scale only (bias 0, ``T = 1 / scale``); ``platt`` fits both, which also absorbs a shift in
prevalence -- what differs most between sites. Per-site calibrators are fitted where the site has
enough patients and both classes; elsewhere, and for an unknown site, the global one applies.
A site's calibrator keeps the global scale and refits only the bias: the bias is what a
prevalence shift moves, and with about 100 validation patients per site a second free parameter
per site fitted noise (model m1000: refitting both took site B's test ECE from 0.050 to 0.082).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.optimize import minimize

from mmcds.fusion.metrics import known

Method = Literal["temperature", "platt"]
#: How a site gets its own calibrator. ``bias_cv``: the global scale with the site's own bias,
#: kept only where cross-validation within the site's validation patients says it helps (a model
#: trained on every site). ``platt``: a full Platt fit on the site's own validation patients
#: wherever the site has ``MIN_PLATT_PATIENTS`` of them (a model trained elsewhere, recalibrated
#: on the local population). Either rule is fixed before the test split is looked at.
SiteRule = Literal["bias_cv", "platt"]

#: A site needs this many validation patients, and this many of each class per finding, for its
#: own calibrator; fewer and the fit would follow noise.
MIN_SITE_PATIENTS = 40
MIN_CLASS_COUNT = 5
MIN_PLATT_PATIENTS = 50


def _nll(params: np.ndarray, z: np.ndarray, y: np.ndarray, method: Method) -> float:
    scale = params[0]
    bias = params[1] if method == "platt" else 0.0
    s = scale * z + bias
    # log(1 + e^s) - y*s, stable both ways
    return float(np.mean(np.logaddexp(0.0, s) - y * s))


def fit_one(
    logits: np.ndarray, labels: np.ndarray, method: Method = "platt"
) -> tuple[float, float]:
    """(scale, bias) minimising the log loss of one finding; identity if a class is absent.
    Patients whose label is unknown (below 0) are left out."""
    y, z = known(labels, logits)
    z, y = np.asarray(z, float), np.asarray(y, float)
    if len(z) == 0 or y.min() == y.max():
        return 1.0, 0.0
    start = np.array([1.0, 0.0]) if method == "platt" else np.array([1.0])
    bounds = [(1e-3, 100.0), (-20.0, 20.0)] if method == "platt" else [(1e-3, 100.0)]
    res = minimize(_nll, start, args=(z, y, method), method="L-BFGS-B", bounds=bounds)
    scale = float(res.x[0])
    bias = float(res.x[1]) if method == "platt" else 0.0
    return scale, bias


def fit_bias(logits: np.ndarray, labels: np.ndarray, scale: float) -> tuple[float, float]:
    """(scale, bias) with ``scale`` fixed and the bias minimising the log loss."""
    y, z = known(labels, logits)
    z, y = np.asarray(z, float), np.asarray(y, float)
    if len(z) == 0 or y.min() == y.max():
        return scale, 0.0

    def nll(b: np.ndarray) -> float:
        return _nll(np.array([scale, float(b[0])]), z, y, "platt")

    res = minimize(nll, np.array([0.0]), method="L-BFGS-B", bounds=[(-20.0, 20.0)])
    return scale, float(res.x[0])


def _site_helps(z: np.ndarray, y: np.ndarray, global_: tuple[float, float], folds: int = 5) -> bool:
    """Whether a site's own bias beats the global calibrator on held-out validation patients
    (k-fold within the site, log loss): a site keeps its own only where that is so."""
    idx = np.arange(len(z))
    own, shared = 0.0, 0.0
    for k in range(folds):
        held, rest = idx % folds == k, idx % folds != k
        if y[rest].min() == y[rest].max() or not held.any():
            return False
        params = np.array(fit_bias(z[rest], y[rest], global_[0]))
        own += _nll(params, z[held], y[held], "platt") * held.sum()
        shared += _nll(np.array(global_), z[held], y[held], "platt") * held.sum()
    return own < shared


@dataclass
class Calibration:
    method: Method
    findings: list[str]
    global_: dict[str, tuple[float, float]]
    sites: dict[str, dict[str, tuple[float, float]]]
    # Other names of a site as the service sees it (DICOM InstitutionName -> the labels' site).
    aliases: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "global": {f: list(v) for f, v in self.global_.items()},
            "sites": {s: {f: list(v) for f, v in d.items()} for s, d in self.sites.items()},
            "aliases": dict(self.aliases),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], findings: Sequence[str]) -> Calibration:
        if not data:
            return identity(findings)
        return cls(
            method=data.get("method", "platt"),
            findings=list(findings),
            global_={f: (float(v[0]), float(v[1])) for f, v in data["global"].items()},
            sites={
                s: {f: (float(v[0]), float(v[1])) for f, v in d.items()}
                for s, d in data.get("sites", {}).items()
            },
            aliases=dict(data.get("aliases", {})),
        )

    def params(self, site: str | None, per_site: bool = True) -> np.ndarray:
        """(F, 2) scale and bias for a patient at ``site``."""
        key = site or ""
        key = key if key in self.sites else self.aliases.get(key, key)
        table = self.sites.get(key, {}) if per_site else {}
        return np.array(
            [table.get(f, self.global_.get(f, (1.0, 0.0))) for f in self.findings], dtype=float
        )

    def apply(
        self, logits: np.ndarray, sites: Sequence[str | None] | None = None, per_site: bool = True
    ) -> np.ndarray:
        """Calibrated probabilities (N, F) from logits (N, F)."""
        z = np.asarray(logits, float)
        sites = list(sites) if sites is not None else [None] * len(z)
        p = np.stack([self.params(s, per_site) for s in sites]) if len(z) else np.zeros((0, 0, 2))
        if len(z) == 0:
            return np.zeros_like(z)
        return 1.0 / (1.0 + np.exp(-(p[..., 0] * z + p[..., 1])))

    @property
    def temperatures(self) -> dict[str, float]:
        return {f: 1.0 / v[0] for f, v in self.global_.items()}


def identity(findings: Sequence[str]) -> Calibration:
    return Calibration("temperature", list(findings), {f: (1.0, 0.0) for f in findings}, {})


def fit_calibration(
    logits: np.ndarray,
    labels: np.ndarray,
    findings: Sequence[str],
    sites: Sequence[str | None] | None = None,
    method: Method = "platt",
    site_rule: SiteRule = "bias_cv",
) -> Calibration:
    z, y = np.asarray(logits, float), np.asarray(labels, float)
    global_ = {f: fit_one(z[:, j], y[:, j], method) for j, f in enumerate(findings)}
    per_site = (
        fit_site_calibrators(z, y, findings, sites, global_, method, site_rule)
        if sites is not None
        else {}
    )
    return Calibration(method, list(findings), global_, per_site)


def fit_site_calibrators(
    logits: np.ndarray,
    labels: np.ndarray,
    findings: Sequence[str],
    sites: Sequence[str | None],
    global_: Mapping[str, tuple[float, float]],
    method: Method = "platt",
    site_rule: SiteRule = "platt",
) -> dict[str, dict[str, tuple[float, float]]]:
    """Per site and finding, the site's own (scale, bias) where ``site_rule`` grants one."""
    z, y = np.asarray(logits, float), np.asarray(labels, float)
    site_arr = np.array([s or "" for s in sites])
    least = MIN_PLATT_PATIENTS if site_rule == "platt" else MIN_SITE_PATIENTS
    per_site: dict[str, dict[str, tuple[float, float]]] = {}
    for site in sorted(set(site_arr) - {""}):
        rows = site_arr == site
        if rows.sum() < least:
            continue
        fitted = {}
        for j, f in enumerate(findings):
            yj, zj = known(y[rows, j], z[rows, j])
            pos = int(yj.sum())
            if min(pos, len(yj) - pos) < MIN_CLASS_COUNT:
                continue
            if site_rule == "platt":
                fitted[f] = fit_one(zj, yj, method)
            elif _site_helps(zj, yj, global_[f]):
                fitted[f] = fit_bias(zj, yj, global_[f][0])
        if fitted:
            per_site[site] = fitted
    return per_site


# --- operating points ---------------------------------------------------------------------------


def sensitivity_threshold(probs: np.ndarray, labels: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity (p >= t among positives) reaches ``target``."""
    pos = np.sort(np.asarray(probs, float)[np.asarray(labels) == 1])
    if len(pos) == 0:
        return 1.01  # nothing to find: never alarm
    k = math.ceil(target * len(pos) - 1e-9)
    return float(pos[len(pos) - k]) if k > 0 else 1.01
