"""``mmcds train`` and ``mmcds evaluate``: from a cohort folder to a model folder and a report.

A model folder holds the fusion checkpoint (``config.json``, ``model.safetensors``, ``README.md``
model card), the lexical path where the cohort has notes (``lexical.json`` +
``lexical.safetensors``), the fitted lab encoder (``lab_encoder.json``) and the fine-tuned image
encoders (``cnn/``, ``vit/``); ``Pipeline.from_settings`` loads all of it from
``MMCDS_FUSION_MODEL``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcds.encoders.image import ImageEncoder
from mmcds.encoders.labs import LabEncoder
from mmcds.encoders.text import TextEncoder
from mmcds.encoders.tiny import build_tiny_cnn, build_tiny_vit
from mmcds.fusion.calibrate import Method, SiteRule, fit_calibration
from mmcds.fusion.data import (
    UNKNOWN,
    EncodedSet,
    few_positive_warnings,
    positives,
    restrict_training,
    split_hash,
    split_patients,
)
from mmcds.fusion.evaluate import evaluate
from mmcds.fusion.lexical import fit_lexical, note_text, use_out_of_fold
from mmcds.fusion.model import FusionModel
from mmcds.fusion.model_card import model_card
from mmcds.fusion.ood import OodDetector
from mmcds.fusion.pipeline import Pipeline, untrained_fusion
from mmcds.fusion.pretrain import PretrainSettings, pretrain_image_encoder
from mmcds.fusion.train import TrainSettings, predict_logits, train_fusion
from mmcds.fusion.validation import Rules, SubsetValidation, in_force, subset_key, validate_subsets
from mmcds.records import MODALITIES, Modality
from mmcds.settings import Settings
from mmcds.store import EmbeddingCache
from mmcds.training import baseline as text_baseline
from mmcds.training.alarms import alarm_lines, alarm_report
from mmcds.training.dataset import Example, cohort_findings
from mmcds.training.encoding import (
    data_hash,
    encode_all,
    load_examples,
    model_pipeline,
    training_images,
    training_masks,
)

log = logging.getLogger(__name__)
Echo = Callable[[str], None]
#: Training radiographs (evenly spread over the split) that fix the int8 activation ranges.
INT8_CALIBRATION_IMAGES = 32


@dataclass
class TrainOptions:
    seed: int = 0
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    pretrain: bool = True
    pretrain_settings: PretrainSettings = field(default_factory=PretrainSettings)
    train_settings: TrainSettings = field(default_factory=TrainSettings)
    calibration: Method = "platt"
    site_calibration: SiteRule = "bias_cv"
    # Train (image encoders, fusion, early stopping) at these sites only; calibrate on every
    # site's validation patients; test at every site. None: every site.
    train_sites: tuple[str, ...] | None = None
    warning_sensitivity: float = Rules.warning_sensitivity
    critical_specificity: float = 0.95
    limit: int | None = None  # first N patients of the labels file (quick runs)
    # The findings to learn (labels-file columns); None: cohort.json's, else every finding column
    findings: tuple[str, ...] | None = None
    finding_catalogue: str | None = None  # a site's catalogue file adding findings
    # TF-IDF + logistic regression over the notes as an input of the text head (fusion/lexical.py).
    # None (auto): on for a cohort without radiographs, where the notes carry the signal and
    # frozen MiniLM alone lost to TF-IDF; off with radiographs, where the default recipe's
    # figures were measured without it (turn it on and compare with `mmcds evaluate`).
    lexical: bool | None = None
    cache_url: str | None = None  # default: settings.database_url
    progress: bool = True


def train_cohort(
    data: Path,
    out: Path,
    settings: Settings,
    options: TrainOptions | None = None,
    echo: Echo = print,
) -> dict[str, Any]:
    """Train, calibrate and save a model folder; returns the summary also written to the card."""
    o = options or TrainOptions()
    timings: dict[str, float] = {}
    t0 = t = time.perf_counter()
    entries = cohort_findings(data, o.findings, o.finding_catalogue or settings.finding_catalogue)
    names = [f.name for f in entries]
    examples = load_examples(data, o.limit, o.progress, names)
    keys = [ex.key for ex in examples]
    split = split_patients(keys, [ex.site for ex in examples], o.seed, o.fractions)
    if o.train_sites:
        split = restrict_training(split, keys, [ex.site for ex in examples], o.train_sites)
        unused = set(split["unused"])
        examples = [ex for ex in examples if ex.key not in unused]
    echo(f"{len(examples)} patients: " + ", ".join(f"{k} {len(v)}" for k, v in split.items()))
    by_key = {ex.key: ex for ex in examples}
    train_ex = [by_key[k] for k in split["train"]]
    val_ex = [by_key[k] for k in split["val"]]
    timings["read_s"] = time.perf_counter() - t

    t = time.perf_counter()
    labs = LabEncoder().fit(ex.record.labs for ex in train_ex)
    out.mkdir(parents=True, exist_ok=True)
    pre_logs = {}
    # Image fine-tuning, mask localisation and int8 calibration need radiographs: a cohort of
    # notes and/or labs trains without them (the image encoders stay random and unused).
    has_images = any(ex.record.images for ex in train_ex) and any(ex.record.images for ex in val_ex)
    if not has_images:
        echo(
            "no radiographs in the training and validation splits: image fine-tuning, mask "
            "localisation and int8 calibration skipped"
        )
    pretrain = o.pretrain and has_images
    # read once for both encoders (only the CNN localises with them: fusion/pretrain.py)
    train_masks = training_masks(train_ex, names) if pretrain else None
    for kind in ("cnn", "vit"):
        folder = out / kind
        if pretrain:
            pre = pretrain_image_encoder(
                kind,
                names,
                *training_images(train_ex, names),
                *training_images(val_ex, names),
                folder,
                o.pretrain_settings,
                o.progress,
                train_masks=train_masks,
            )
            pre_logs[kind] = asdict(pre)
            echo(f"{kind}: best val loss {pre.best_val_loss:.4f} at epoch {pre.best_epoch}")
        else:
            (build_tiny_cnn if kind == "cnn" else build_tiny_vit)(folder)
    timings["pretrain_s"] = time.perf_counter() - t

    t = time.perf_counter()
    cnn = ImageEncoder.from_pretrained(str(out / "cnn"))
    vit = ImageEncoder.from_pretrained(str(out / "vit"))
    if has_images and cnn.device.type == "cpu" and vit.device.type == "cpu":
        t_q = time.perf_counter()
        train_pixels = training_images(train_ex, names)[0]
        cnn, vit = (quantize(enc, train_pixels) for enc in (cnn, vit))
        timings["quantize_s"] = time.perf_counter() - t_q
    text = TextEncoder.from_pretrained(settings.text_model or None)
    cache = EmbeddingCache(o.cache_url or settings.database_url)
    pipe = Pipeline(cnn, vit, text, labs, untrained_fusion(cnn, vit, text, labs, entries), cache)
    lexical = (not has_images) if o.lexical is None else o.lexical
    if not lexical:
        echo("lexical path: off (--lexical turns it on)")
    oof = _fit_lexical(pipe.fusion, train_ex, o, echo) if lexical else None
    encoded = encode_all(pipe, examples, o.progress)
    if oof is not None:  # the training patients learn from logits of fits that never saw them
        use_out_of_fold(encoded.select_keys(split["train"]).encodings, oof)
    timings["encode_s"] = time.perf_counter() - t

    t = time.perf_counter()
    config = pipe.fusion.config
    config.modalities = list(_modalities(encoded))
    echo(f"findings: {', '.join(names)}; modalities: {', '.join(config.modalities)}")
    train, val = encoded.select_keys(split["train"]), encoded.select_keys(split["val"])
    counts = {"train": positives(train), "val": positives(val)}
    few = few_positive_warnings(counts["train"], counts["val"])
    for f in few:
        echo(f"warning: {f}: {few[f]}")
    model, tlog = train_fusion(
        config, train, val, o.train_settings, o.progress, pipe.fusion.lexical
    )
    echo(f"fusion: {tlog.epochs_run} epochs, best val loss {tlog.best_val_loss:.4f}")
    timings["fusion_s"] = time.perf_counter() - t

    val_logits = predict_logits(model, val.encodings)
    cal = fit_calibration(
        val_logits, val.labels, config.findings, val.sites, o.calibration, o.site_calibration
    )
    cal.aliases = {
        img.site: ex.site for ex in examples for img in ex.record.images if img.site and ex.site
    }
    config.calibration = cal.to_json()
    config.temperature = cal.temperatures
    rules = Rules(
        warning_sensitivity=o.warning_sensitivity, critical_specificity=o.critical_specificity
    )
    subsets = validate_subsets(model, val, cal, _modalities(encoded), rules, seed=o.seed)
    config.subsets = {k: v.to_json() for k, v in subsets.items()}
    # The model-wide points (model card, `mmcds evaluate`) are those the service applies to a
    # patient with every input: the full subset's, after its validation rules.
    full = subsets[subset_key(sorted(_modalities(encoded)))]
    config.warning_threshold, config.critical_threshold = in_force(full, config.findings)
    echo(_validation_line(subsets))
    ood = OodDetector.fit(train.encodings, val.encodings, [ex.record for ex in train_ex])
    config.trained = True
    timings["total_s"] = time.perf_counter() - t0
    config.training = {
        "data": str(data),
        "data_hash": data_hash(encoded),
        "split_hash": split_hash(split),
        "split": split,
        "seed": o.seed,
        "operating_points": {
            **asdict(rules),
            "chosen_on": "validation split, calibrated probabilities",
        },
        "image_encoders": "fine-tuned on the training split" if pretrain else "random, frozen",
        "modalities": config.modalities,
        "positives": counts,
        "few_positives": few,
        "pretrain": pre_logs,
        "fusion": asdict(tlog),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "cohort": _cohort_meta(data),
    }
    if o.train_sites or o.site_calibration != "bias_cv":
        config.training["train_sites"] = sorted(o.train_sites) if o.train_sites else "all"
        config.training["site_calibration"] = o.site_calibration
    config.version = f"fusion-{config.training['data_hash'][:8]}-{_weights_digest(model)}"
    val_metrics = evaluate(model, val, n_boot=0)
    val_metrics["warnings"] = {"few_positives": few}
    model.save_pretrained(out, model_card(config, val_metrics))
    ood.save(out)
    labs.save_pretrained(out)
    (out / "val_metrics.json").write_text(json.dumps(val_metrics, indent=1))
    echo(f"saved {out} ({config.version}): {config.training['timings_s']}")
    return config.training


def _fit_lexical(
    fusion: FusionModel, train_ex: Sequence[Example], o: TrainOptions, echo: Echo
) -> np.ndarray | None:
    """Fit the lexical path on the training split's notes into ``fusion``; returns the training
    patients' out-of-fold logits (None without notes: the model then has no lexical path)."""
    if not any(ex.record.notes for ex in train_ex):
        return None
    names = fusion.config.findings
    labels = np.array([[ex.labels.get(f, UNKNOWN) for f in names] for ex in train_ex], float)
    texts = [note_text(ex.record.notes) for ex in train_ex]
    fusion.lexical, oof = fit_lexical(texts, labels, names, seed=o.seed)
    fusion.config.lexical = fusion.lexical.summary()
    echo(f"lexical path: {len(fusion.lexical.terms)} terms, fitted on {len(texts)} patients")
    return oof


def _modalities(encoded: EncodedSet) -> list[Modality]:
    """The modalities present in the cohort, in the canonical order."""
    seen = {m for e in encoded.encodings for m in e.present}
    return [m for m in MODALITIES if m in seen]


def _validation_line(subsets: dict[str, SubsetValidation]) -> str:
    parts = []
    for key, sub in subsets.items():
        ok = [f for f, v in sub.findings.items() if v.validated]
        parts.append(f"{key}: {len(ok)}/{len(sub.findings)}")
    return "validated findings per input subset: " + ", ".join(parts)


def evaluate_cohort(
    model_dir: Path,
    data: Path,
    out: Path,
    settings: Settings,
    *,
    n_boot: int = 1000,
    cache_url: str | None = None,
    split: str = "test",
    baseline: str | None = None,
    progress: bool = True,
    echo: Echo = print,
) -> dict[str, Any]:
    """Encode ``data`` with the model folder's encoders and write metrics.json + report.html.

    Only patients the model has not learned from are scored: see ``scored_patients``. With
    ``baseline="tfidf"``, TF-IDF + logistic regression fitted on the model's training split is
    scored beside it (``mmcds.training.baseline``).
    """
    from mmcds.fusion.report_html import write_report

    model = FusionModel.from_pretrained(model_dir)
    pipe = model_pipeline(model_dir, settings, cache_url)
    examples = load_examples(data, None, progress, model.config.findings)
    keys, scored = scored_patients(model.config.training, split, {ex.key for ex in examples})
    chosen = [ex for ex in examples if ex.key in keys]
    echo(f"evaluating {len(chosen)} of {len(examples)} patients ({scored})")
    encoded = encode_all(pipe, chosen, progress)
    metrics = evaluate(model, encoded, n_boot=n_boot)
    metrics["alarms"] = alarm_report(pipe, chosen, encoded)
    for line in alarm_lines(metrics["alarms"]):
        echo(line)
    metrics["data"]["folder"] = str(data)
    metrics["data"]["split"] = scored
    few = model.config.training.get("few_positives", {})
    metrics["warnings"] = {"few_positives": few}
    for f in few:
        echo(f"warning: {f}: {few[f]}")
    if baseline is not None:
        if baseline != text_baseline.NAME:
            raise ValueError(f"unknown baseline {baseline!r}: the one there is is 'tfidf'")
        metrics["baseline"] = text_baseline.baseline_report(
            model, examples, chosen, encoded, n_boot
        )
        for line in text_baseline.lines(metrics["baseline"]):
            echo(line)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    write_report(metrics, out / "report.html")
    return metrics


def quantize(encoder: ImageEncoder, pixels: Sequence[np.ndarray]) -> ImageEncoder:
    """The encoder on its int8 graph, the one the service's default CPU path runs
    (``backend="auto"``), calibrated on training radiographs: the activation ranges must come
    from images like those the service will see. Training embeds through it too, so the fusion
    model learns on exactly the embeddings it will be served."""
    step = max(1, len(pixels) // INT8_CALIBRATION_IMAGES)
    return encoder.quantize(list(pixels[::step][:INT8_CALIBRATION_IMAGES]))


def scored_patients(training: dict[str, Any], split: str, keys: set[str]) -> tuple[set[str], str]:
    """Which of ``keys`` to score, and what they are: the patients held out by ``mmcds
    calibrate`` when the model was recalibrated on this folder, else the ``split`` patients when
    it was trained on it, else all (another cohort)."""
    local = training.get("local_calibration", {})
    if keys & set(local.get("calibration", [])):
        return keys & set(local["test"]), "held out by local calibration"
    in_split = keys & set(training.get("split", {}).get(split, []))
    if in_split:
        return in_split, f"{split} split"
    return keys, "all"


def _cohort_meta(data: Path) -> dict[str, Any]:
    path = data / "cohort.json"
    if not path.is_file():
        return {}
    meta = json.loads(path.read_text())
    return {k: meta.get(k) for k in ("generator", "seed", "args")}


def _weights_digest(model: FusionModel) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    if model.lexical is not None:  # fitted, not a weight, but the model's as much
        for array in (model.lexical.idf, model.lexical.coef, model.lexical.intercept):
            h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:8]
