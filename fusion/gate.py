"""The gate between the fusion model's numbers and what a clinician is shown (DESIGN §8).

``assess`` turns one patient's encodings into an ``Assessment``: calibrated probabilities for
the subset of inputs the patient brought, and for each finding the thresholds in force, or, when
the finding may not be acted on, the status and the reason:

- ``not_validated``: the finding failed validation on the full set of inputs;
- ``insufficient_inputs``: the patient's subset of inputs was never validated for it;
- ``abstained``: an input lies outside what the model was validated on (``fusion.ood``).

Only ``assessed`` findings can raise ``warning`` or ``critical``.
"""

from __future__ import annotations

from mmcds.fusion.model import FusionModel
from mmcds.fusion.ood import MODALITY_WORDS, OodDetector
from mmcds.fusion.train import predict_logits
from mmcds.fusion.validation import NEVER, SubsetValidation, mask, subset_key
from mmcds.records import (
    MODALITIES,
    Assessment,
    Encodings,
    FindingScore,
    FindingStatus,
    PatientRecord,
)


def assess(
    model: FusionModel,
    encodings: Encodings,
    site: str | None = None,
    record: PatientRecord | None = None,
    ood: OodDetector | None = None,
) -> Assessment:
    """``site`` (e.g. the images' InstitutionName) selects a per-site calibration if any;
    ``record`` feeds the out-of-distribution checks (image facts, lab ranges)."""
    config = model.config
    model.check_encoders(encodings)
    validated = {k: SubsetValidation.from_json(v) for k, v in config.subsets.items()}
    known = set(config.modalities) or _full_subset(validated) or set(config.input_dims)
    present = set(encodings.present)
    used = mask(encodings, known)
    key = subset_key(sorted(present & known))
    subset = validated.get(key)
    if subset is None or subset.calibration is None:
        probs = model.predict_proba([used], [site])[0]
    else:
        logits = predict_logits(model, [used])
        probs = subset.probabilities(logits, config.findings)[0]
    outside = ood.check(record, used) if ood is not None and record is not None else {}
    scores = [
        _score(name, float(p), config.trained, bool(validated), subset, key, outside)
        for name, p in zip(config.findings, probs, strict=True)
    ]
    return Assessment(
        findings=scores,
        model_id="mmcds-fusion",
        model_version=config.version,
        trained=config.trained,
        modalities_used=used.present,
        calibration=(
            str(config.calibration.get("method", "temperature"))
            if config.calibration
            else "temperature"
            if config.temperature
            else "none"
        ),
        subset=key,
        out_of_distribution=outside,
        unused_modalities=[m for m in MODALITIES if m in present - known],
    )


def _full_subset(validated: dict[str, SubsetValidation]) -> set[str]:
    """The modalities the model was validated with: its largest validated subset."""
    sizes = sorted(validated.values(), key=lambda v: len(v.modalities))
    return set(sizes[-1].modalities) if sizes else set()


def _inputs_words(key: str) -> str:
    return " + ".join(MODALITY_WORDS.get(m, m) for m in key.split("+"))


def _score(
    name: str,
    probability: float,
    trained: bool,
    has_validation: bool,
    subset: SubsetValidation | None,
    key: str,
    ood: dict[str, str],
) -> FindingScore:
    """One finding's score with the thresholds and status in force for this patient."""
    if not trained:  # an untrained model never alarms; its cards say it is untrained
        return FindingScore(name, probability, NEVER, NEVER)
    if not has_validation:
        return FindingScore(
            name, probability, NEVER, NEVER, "not_validated",
            "this model carries no validation per input subset: retrain it with this mmcds",
        )  # fmt: skip
    if ood:
        why = "; ".join(ood.values())
        reason = f"outside what this model was validated on: {why}"
        return FindingScore(name, probability, NEVER, NEVER, "abstained", reason)
    check = subset.findings.get(name) if subset is not None else None
    if subset is None or check is None:
        reason = f"insufficient inputs to assess: {_inputs_words(key)} alone was never validated"
        return FindingScore(name, probability, NEVER, NEVER, "insufficient_inputs", reason)
    if not check.validated:
        full = subset.calibration is None  # only the full subset keeps the model's calibrator
        status: FindingStatus = "not_validated" if full else "insufficient_inputs"
        prefix = (
            "not validated"
            if full
            else f"insufficient inputs to assess ({_inputs_words(key)} alone)"
        )
        return FindingScore(
            name, probability, NEVER, NEVER, status, f"{prefix}: {check.reasons[0]}"
        )
    warning, critical = check.in_force()
    return FindingScore(name, probability, warning, critical)
