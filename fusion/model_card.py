"""The model card written beside a trained fusion checkpoint (Markdown)."""

from __future__ import annotations

import json
from typing import Any

from mmcds.fusion.data import FEW_POSITIVES
from mmcds.fusion.model import FusionConfig
from mmcds.fusion.validation import subset_key


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def _point(threshold: float | None) -> str:
    """A threshold in force; one above any probability means the level is never raised."""
    return "never" if threshold is not None and threshold > 1 else _fmt(threshold)


def _localisation(training: dict[str, Any]) -> str:
    cnn = training.get("pretrain", {}).get("cnn", {})
    if not cnn.get("masked_images"):
        return "The CNN learned from labels only: nothing told it where the lesions are."
    return (
        f"The CNN was also taught where: on the {cnn['masked_images']} training images with "
        f"lesion masks, a localisation term (weight {cnn['localise']:g}) asked its class "
        "activation map to peak on the lesion. Its heatmaps were shaped by those masks, so "
        "pointing at the lesion on new images is expected of them, not proof of what the "
        "classifier relies on; the occlusion part of the heatmap is the check on that."
    )


def _lexical(config: FusionConfig) -> str:
    lex = config.lexical
    if not lex:
        return ""
    return (
        f"Beside it, a lexical path: {lex['method']}, fitted on the training split's notes "
        f"({lex['patients']} patients, {lex['vocabulary']} terms), whose per-finding logit the "
        "text head adds (learned scale) while notes are present; fusion learned from its "
        f"out-of-fold logits ({lex.get('out_of_fold', 'n/a')}); `lexical.json` and "
        "`lexical.safetensors` beside this card. "
    )


def _image_encoders(config: FusionConfig) -> str:
    t = config.training
    if config.modalities and "image" not in config.modalities:
        return (
            "The training cohort had no radiographs: the image encoders were neither trained nor "
            "used, and this model reads no images."
        )
    return (
        "The image encoders (a tiny ResNet and a tiny ViT) were **fine-tuned** as multi-label "
        "classifiers of these findings on the training split's images only "
        f"({t.get('image_encoders', 'n/a')}), then frozen; their checkpoints are the `cnn/` and "
        f"`vit/` folders beside this card. {_localisation(t)}"
    )


def _validation(config: FusionConfig) -> str:
    """The per-subset validation table: which findings may alarm on which inputs, and why not."""
    rows = []
    for key, sub in config.subsets.items():
        for f, v in sub["findings"].items():
            ci = v.get("auroc_ci")
            ci_text = f"{ci[0]:.2f}–{ci[1]:.2f}" if ci else "n/a"
            if not v["validated"]:
                state = "**not validated**: " + "; ".join(v["reasons"])
            else:
                state = (
                    "validated, may raise critical"
                    if v["critical_allowed"]
                    else ("validated, warning only (no critical point reached)")
                )
            rows.append(
                f"| {key} | {f} | {v['n']} ({v['positives']}) | {_fmt(v.get('auroc'))} | "
                f"{ci_text} | {_fmt(v.get('warning_sensitivity'))} / "
                f"{_fmt(v.get('warning_specificity'))} | {_fmt(v.get('critical_specificity'))} "
                f"| {state} |"
            )
    if not rows:
        return "No per-subset validation was recorded: this model never raises an alert."
    return (
        "| inputs | finding | validation n (positives) | AUROC | 95% CI | warning sens / spec "
        "| critical spec | status |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )


def _balance(training: dict[str, Any]) -> str:
    """Positives per split, and the warning for findings with few of them."""
    counts = training.get("positives")
    if not counts:
        return "Not recorded for this model."
    rows = "\n".join(
        f"| {f} | {n} | {counts.get('val', {}).get(f, 'n/a')} |"
        for f, n in counts.get("train", {}).items()
    )
    few = training.get("few_positives", {})
    warnings = "".join(f"\n- **Warning, {f}**: {text}." for f, text in few.items())
    return f"| finding | training positives | validation positives |\n|---|---|---|\n{rows}\n" + (
        warnings or f"\nEvery finding had at least {FEW_POSITIVES} positive patients in training."
    )


def model_card(config: FusionConfig, val_metrics: dict[str, Any]) -> str:
    t = config.training
    all_ = val_metrics.get("subsets", {}).get("image+text+labs", {})
    # the bootstrap CI of the validation AUROC on every input the model has (validation.py)
    full = config.subsets.get(subset_key(config.modalities), {}).get("findings", {})

    def _ci(f: str) -> str:
        ci = full.get(f, {}).get("auroc_ci")
        return f"{ci[0]:.2f}–{ci[1]:.2f}" if ci else "n/a"

    rows = "\n".join(
        f"| {f} | {m.get('positives', 'n/a')} | {_fmt(m.get('auroc'))} | {_ci(f)} | "
        f"{_fmt(m.get('auprc'))} | {_fmt(m.get('ece'))} | "
        f"{_point(config.warning_threshold.get(f))} | {_point(config.critical_threshold.get(f))} |"
        for f, m in all_.items()
    )
    split = t.get("split", {})
    sizes = ", ".join(f"{k} {len(v)}" for k, v in split.items())
    ops = t.get("operating_points", {})
    site_cal = ", ".join(config.calibration.get("sites", {})) or "none"
    return f"""# mmcds fusion model {config.version}

Status: trained. Every output is preliminary decision support until a clinician accepts it.

## Intended use
Flags {", ".join(config.findings)} for clinicians reviewing an adult inpatient's chest radiograph,
clinical notes and recent labs, from a CDS Hooks service. It supports review and prioritisation;
it does not diagnose, and must not be used autonomously or on populations it was not checked on.

## Model
Attention over modality tokens (one per image, one per note chunk, one per lab; width
{config.d_model}, {config.n_layers} layer(s), {config.n_heads} heads) plus, per present
modality, logits from the mean and max of its tokens (architecture `{config.architecture}`),
with masks for missing modalities and modality dropout ({config.modality_dropout}) in training,
so any subset of modalities can be scored. One calibrated probability per finding.

Encoders: the text encoder is frozen. {_lexical(config)}{_image_encoders(config)} Encoder ids:

```json
{json.dumps(config.encoder_ids, indent=2)}
```

## Data
Trained on `{t.get("data", "n/a")}` (cohort {json.dumps(t.get("cohort", {}))}), data hash
`{t.get("data_hash", "n/a")}`, split hash `{t.get("split_hash", "n/a")}`. Patient-level split,
stratified by site, seed {t.get("seed")}: {sizes}. The test split took no part in training,
early stopping or calibration.

## Class balance
{_balance(t)}

## Calibration and operating points
{config.calibration.get("method", "none")} scaling per finding on the validation split, with a
per-site calibrator where the site had enough patients ({site_cal}).
Per subset of inputs (the other modalities masked on the validation split), a finding is
*validated* only if its AUROC's bootstrap 95% CI excludes 0.5, its calibrator is not degenerate,
and a warning point exists: the highest sensitivity from {ops.get("warning_sensitivity")} down
to {ops.get("warning_sensitivity_floor", 0.85)} keeping specificity at least
{ops.get("min_warning_specificity", 0.5)}. `critical` needs specificity
{ops.get("critical_specificity")} with a Wilson 95% lower bound of at least
{ops.get("critical_specificity_lower", 0.95)}. A finding that
is not validated for the inputs a patient brings is shown as not assessed and never alarms
(`mmcds.fusion.validation`).

{_validation(config)}

## Metrics (validation split, all modalities)
Warning and critical: the thresholds in force for a patient with every input, after the
validation rules above ("never": the finding is not validated, or critical is not allowed).

| finding | positives | AUROC | 95% CI (bootstrap) | AUPRC | ECE | warning | critical |
|---|---|---|---|---|---|---|---|
{rows}

Test-split metrics with confidence intervals, per modality subset, site and subgroup come from
`mmcds evaluate` (metrics.json and report.html).

## Limits
- Trained and checked on a **synthetic** cohort only; its findings, sites and artefacts are
  simplified. Performance on real patients is unknown until checked on the local population.
- Calibration and thresholds are per site for the sites seen in training; an unknown site gets
  the global calibrator, and its calibration must be checked before use.
- With modalities missing, discrimination drops (see the report) and calibration was fitted with
  all modalities present.
- Labels may be noisy; saliency and evidence spans may mislead.
"""
