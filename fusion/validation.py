"""Which findings may alarm, per subset of inputs: validation figures and operating points.

The fusion model runs on any subset of its modalities, and a patient often brings fewer than it
was trained with (labs only, notes without images). So calibration and operating points are set
per *subset*: each subset that occurs is simulated on the validation split by masking the other
modalities, calibrated (the full subset keeps the site-aware calibrator), given warning and
critical thresholds, and validated finding by finding (DESIGN §8). A finding alarms on a patient
only if it passed for the subset that patient brings.

Rules, each fixed before the test split is looked at (``Rules``):

- discrimination: the validation AUROC's bootstrap 95% CI must lie above 0.5;
- calibrator: not degenerate (slope well above 0, calibrated probabilities that actually vary
  between patients; a collapsed calibrator gives every patient the same number);
- warning point: the highest sensitivity from ``warning_sensitivity`` down to
  ``warning_sensitivity_floor`` that keeps at least ``min_warning_specificity`` (a threshold
  that flags everyone is no operating point); the sensitivity reached is recorded;
- critical point: the lowest threshold whose specificity's Wilson 95% lower bound is at least
  ``critical_specificity_lower`` (0.95: at least 73 validation patients without the finding,
  and none of them flagged, before any critical point exists), reached by at least one
  positive; where there is none the finding may still warn, never go critical.

A finding that fails any of the first three rules is *not validated* for that subset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from mmcds.fusion.calibrate import Calibration, fit_one, sensitivity_threshold
from mmcds.fusion.data import EncodedSet
from mmcds.fusion.metrics import auroc, known
from mmcds.fusion.model import FusionModel
from mmcds.fusion.train import predict_logits
from mmcds.records import MODALITIES, Encodings, Modality

#: Never reached by a probability: the threshold of a level that may not fire.
NEVER = 1.01


def subset_key(modalities: Sequence[str]) -> str:
    """A stable name for a set of modalities: ``"image+labs+text"``."""
    return "+".join(sorted(set(modalities))) or "none"


@dataclass(frozen=True)
class Rules:
    auroc_ci_level: float = 0.95
    n_boot: int = 300
    min_patients: int = 20
    min_positives: int = 5
    min_scale: float = 0.05  # Platt slope on the logit
    min_probability_spread: float = 0.01  # standard deviation of calibrated probabilities
    # A warning must spare most patients without the finding: at specificity 0.5 a finding
    # with 22% prevalence flagged 61% of all patients (the demo model, issue 21), which is
    # how clinicians learn to ignore alerts. So specificity is held at 0.8 and sensitivity
    # gives way first, down to its floor.
    warning_sensitivity: float = 0.90
    warning_sensitivity_floor: float = 0.70
    min_warning_specificity: float = 0.80
    # Critical is the alert a clinician must act on now, so its specificity is promised with
    # confidence: the Wilson 95% lower bound itself must reach 0.95. A lower bound of 0.90
    # let the demo model's heart failure point, 0.95 on 85 validation negatives, fall to 0.86
    # on the test split (28% of patients got a critical alert, issue 21).
    critical_specificity: float = 0.95
    critical_specificity_lower: float = 0.95


@dataclass
class FindingValidation:
    """The validation figures of one finding on one subset, and what they allow."""

    n: int
    positives: int
    auroc: float | None
    auroc_ci: tuple[float, float] | None
    scale: float
    probability_spread: float
    warning_threshold: float
    critical_threshold: float
    warning_sensitivity: float | None
    warning_specificity: float | None
    critical_specificity: float | None
    critical_specificity_lower: float | None
    validated: bool = False
    critical_allowed: bool = False
    reasons: list[str] = field(default_factory=list)

    def in_force(self) -> tuple[float, float]:
        """The (warning, critical) thresholds the service applies: ``NEVER`` where the finding
        is not validated, and for critical where critical is not allowed."""
        if not self.validated:
            return NEVER, NEVER
        return self.warning_threshold, self.critical_threshold if self.critical_allowed else NEVER

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FindingValidation:
        ci = data.get("auroc_ci")
        return cls(**{**data, "auroc_ci": tuple(ci) if ci else None})


@dataclass
class SubsetValidation:
    """One subset of modalities: its calibrator (None = the model's site-aware one) and, per
    finding, the validation and thresholds in force."""

    modalities: list[str]
    calibration: dict[str, tuple[float, float]] | None
    findings: dict[str, FindingValidation]

    def to_json(self) -> dict[str, Any]:
        return {
            "modalities": self.modalities,
            "calibration": (
                {f: list(v) for f, v in self.calibration.items()} if self.calibration else None
            ),
            "findings": {f: v.to_json() for f, v in self.findings.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SubsetValidation:
        cal = data.get("calibration")
        return cls(
            modalities=list(data["modalities"]),
            calibration={f: (float(v[0]), float(v[1])) for f, v in cal.items()} if cal else None,
            findings={f: FindingValidation.from_json(v) for f, v in data["findings"].items()},
        )

    def probabilities(self, logits: np.ndarray, findings: Sequence[str]) -> np.ndarray:
        """This subset's own calibration of (N, F) logits (not for the full subset)."""
        assert self.calibration is not None
        p = np.array([self.calibration.get(f, (1.0, 0.0)) for f in findings], dtype=float)
        return 1.0 / (1.0 + np.exp(-(p[:, 0] * np.asarray(logits, float) + p[:, 1])))


def _wilson_lower(successes: int, n: int, z: float = 1.96) -> float | None:
    if n == 0:
        return None
    p = successes / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - margin) / (1 + z * z / n)


def _bootstrap_auroc_ci(
    p: np.ndarray, y: np.ndarray, rules: Rules, rng: np.random.Generator
) -> tuple[float, float] | None:
    values = []
    for _ in range(rules.n_boot):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() != y[idx].max():
            values.append(auroc(y[idx], p[idx]))
    if len(values) < rules.n_boot // 2:
        return None
    alpha = (1 - rules.auroc_ci_level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def warning_point(p: np.ndarray, y: np.ndarray, rules: Rules) -> float:
    """The warning threshold: the highest sensitivity target (in steps of 0.01 from
    ``warning_sensitivity`` to the floor) whose threshold keeps the specificity floor; the
    target's own threshold when none does (validation then says why)."""
    neg = p[y == 0]
    steps = np.arange(rules.warning_sensitivity, rules.warning_sensitivity_floor - 1e-9, -0.01)
    for target in steps:
        t = sensitivity_threshold(p, y, float(target))
        if len(neg) and (neg < t).mean() >= rules.min_warning_specificity:
            return t
    return sensitivity_threshold(p, y, rules.warning_sensitivity)


def critical_point(p: np.ndarray, y: np.ndarray, rules: Rules) -> float:
    """The lowest threshold whose specificity, and its Wilson lower bound, reach the targets."""
    neg = np.sort(p[y == 0])
    for k in range(1, len(neg) + 1):  # k negatives below the threshold
        lower = _wilson_lower(k, len(neg))
        if k / len(neg) >= rules.critical_specificity and (lower or 0) >= (
            rules.critical_specificity_lower
        ):
            return float(np.nextafter(neg[k - 1], np.inf))
    return NEVER


def validate_finding(
    probs: np.ndarray,
    labels: np.ndarray,
    scale: float,
    warning: float,
    critical: float,
    rules: Rules,
    rng: np.random.Generator,
) -> FindingValidation:
    """Apply the rules to one finding's calibrated validation probabilities (patients whose
    label is unknown left out)."""
    y, p = known(np.asarray(labels, int), np.asarray(probs, float))
    pos, neg = y == 1, y == 0
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    both = n_pos > 0 and n_neg > 0
    crit_tn = int((p[neg] < critical).sum())
    out = FindingValidation(
        n=len(y),
        positives=n_pos,
        auroc=float(auroc(y, p)) if both else None,
        auroc_ci=_bootstrap_auroc_ci(p, y, rules, rng) if both else None,
        scale=float(scale),
        probability_spread=float(p.std()) if len(p) else 0.0,
        warning_threshold=float(warning),
        critical_threshold=float(critical),
        warning_sensitivity=float((p[pos] >= warning).mean()) if n_pos else None,
        warning_specificity=float((p[neg] < warning).mean()) if n_neg else None,
        critical_specificity=crit_tn / n_neg if n_neg else None,
        critical_specificity_lower=_wilson_lower(crit_tn, n_neg),
    )
    reasons = out.reasons
    if len(y) < rules.min_patients or min(n_pos, n_neg) < rules.min_positives:
        reasons.append(
            f"too few validation patients ({len(y)}, {n_pos} with the finding; needs "
            f"{rules.min_patients} and {rules.min_positives} of each class)"
        )
    if out.auroc_ci is None or out.auroc_ci[0] <= 0.5:
        shown = f"{out.auroc_ci[0]:.2f}–{out.auroc_ci[1]:.2f}" if out.auroc_ci else "undefined"
        reasons.append(f"validation AUROC 95% CI {shown} does not exclude chance")
    if scale < rules.min_scale or out.probability_spread < rules.min_probability_spread:
        reasons.append(
            f"degenerate calibrator (slope {scale:.3g}, probability spread "
            f"{out.probability_spread:.3g}): every patient would get about the same number"
        )
    sens, spec = out.warning_sensitivity, out.warning_specificity
    if sens is None or sens < rules.warning_sensitivity_floor - 1e-9 or warning >= NEVER:
        reasons.append(
            f"warning point misses its sensitivity floor {rules.warning_sensitivity_floor}"
        )
    elif spec is None or spec < rules.min_warning_specificity:
        reasons.append(
            f"warning point flags too many: specificity {spec or 0:.2f} below "
            f"{rules.min_warning_specificity}"
        )
    out.validated = not reasons
    lower = out.critical_specificity_lower
    out.critical_allowed = (
        out.validated
        and critical < NEVER
        and (out.critical_specificity or 0) >= rules.critical_specificity - 1e-9
        and lower is not None
        and lower >= rules.critical_specificity_lower
        and bool((p[pos] >= critical).any())
    )
    return out


def mask(encodings: Encodings, keep: set[str]) -> Encodings:
    """The same patient with only the ``keep`` modalities."""
    return Encodings({m: e for m, e in encodings.by_modality.items() if m in keep})


def validate_subsets(
    model: FusionModel,
    val: EncodedSet,
    calibration: Calibration,
    modalities: Sequence[Modality] = MODALITIES,
    rules: Rules | None = None,
    seed: int = 0,
) -> dict[str, SubsetValidation]:
    """Per non-empty subset of ``modalities``: calibrate on the validation patients that have
    every modality of the subset (the others masked), set thresholds and validate."""
    rules = rules or Rules()
    rng = np.random.default_rng(seed)
    findings = model.config.findings
    full = set(modalities)
    out: dict[str, SubsetValidation] = {}
    for size in range(len(modalities), 0, -1):
        for subset in combinations(sorted(modalities), size):
            keep = set(subset)
            rows = [i for i, e in enumerate(val.encodings) if keep <= set(e.present)]
            removed = sorted(full - keep)
            items = [val.encodings[i] for i in rows]
            y = val.labels[rows]
            z = predict_logits(model, items, removed=removed)
            if keep == full:
                table = None  # the model's own, site-aware calibrator
                probs = calibration.apply(z, [val.sites[i] for i in rows])
                scales = {f: calibration.global_.get(f, (1.0, 0.0))[0] for f in findings}
            else:
                table = {f: fit_one(z[:, j], y[:, j]) for j, f in enumerate(findings)}
                probs = SubsetValidation(list(subset), table, {}).probabilities(z, findings)
                scales = {f: table[f][0] for f in findings}
            warn = {f: NEVER for f in findings}
            crit = dict(warn)
            for j, f in enumerate(findings):
                yj, pj = known(y[:, j], probs[:, j]) if len(rows) else (np.zeros(0), np.zeros(0))
                if len(yj) and yj.min() != yj.max():
                    warn[f] = warning_point(pj, yj, rules)
                    crit[f] = max(critical_point(pj, yj, rules), warn[f])
            out[subset_key(subset)] = SubsetValidation(
                modalities=list(subset),
                calibration=table,
                findings={
                    f: validate_finding(
                        probs[:, j] if len(rows) else np.zeros(0),
                        y[:, j] if len(rows) else np.zeros(0),
                        scales[f],
                        warn[f],
                        crit[f],
                        rules,
                        rng,
                    )
                    for j, f in enumerate(findings)
                },
            )
    return out


def in_force(
    subset: SubsetValidation, findings: Sequence[str]
) -> tuple[dict[str, float], dict[str, float]]:
    """Per finding, the warning and critical thresholds the service applies with this subset
    of inputs (``FindingValidation.in_force``)."""
    points = {f: subset.findings[f].in_force() for f in findings}
    return {f: w for f, (w, _) in points.items()}, {f: c for f, (_, c) in points.items()}
