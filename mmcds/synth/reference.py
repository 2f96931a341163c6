"""Honest reference models over a generated cohort: how the evidence is split, and site shift.

They read what the service would read — bundles (lab Observations converted to canonical units
through the catalogue, note text from DocumentReferences) and DICOM pixels (Modality and VOI
LUTs applied, MONOCHROME1 inverted) — never the latent truth. Logistic regression on lab
features, on TF-IDF of the notes and on downsampled pixels; "all" stacks the three out-of-fold
probabilities with another logistic regression. Train on one half, score on the other.

    python -m mmcds.synth.reference --patients 1000 --seed 7 --out /tmp/cohort \\
        --markdown docs/results/synth-reference.md
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from mmcds.encoders.catalogue import BY_LOINC, LABS, to_canonical
from mmcds.findings import SYNTH_FINDINGS

MODALITIES = ("labs", "text", "image")
LAB_STATS = ("first", "max", "min", "last")


@dataclass
class CohortData:
    keys: list[str]
    sites: np.ndarray  # (n,) site names
    noisy: dict[str, np.ndarray]  # finding -> 0/1 labels used for training
    truth: dict[str, np.ndarray]  # finding -> 0/1 noise-free labels used for scoring
    labs: np.ndarray  # (n, n_lab_features), NaN where missing
    texts: list[str]
    pixels: np.ndarray  # (n, size*size) in [0, 1]


@dataclass
class ReferenceResult:
    auroc: dict[str, dict[str, float]]  # finding -> modality (labs/text/image/all) -> AUROC
    site_shift: dict[str, dict[str, float]] = field(default_factory=dict)  # finding -> A->A, A->B
    n_train: int = 0
    n_test: int = 0

    def best_single(self, finding: str) -> tuple[str, float]:
        row = self.auroc[finding]
        m = max(MODALITIES, key=lambda k: row[k])
        return m, row[m]


def read_image(path: Path, size: int) -> np.ndarray:
    """Pixels as the pipeline sees them: bright = dense, [0, 1], box-downsampled."""
    ds = pydicom.dcmread(path)
    a = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
    a = np.clip((a - (centre - width / 2)) / width, 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        a = 1.0 - a
    small = Image.fromarray(a, mode="F").resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)


def _bundle_features(bundle: dict[str, Any]) -> tuple[np.ndarray, str]:
    series: dict[str, list[tuple[str, float]]] = {s.name: [] for s in LABS}
    texts: list[tuple[str, str]] = []
    for e in bundle["entry"]:
        r = e["resource"]
        if r["resourceType"] == "Observation":
            spec = BY_LOINC[r["code"]["coding"][0]["code"]]
            q = r["valueQuantity"]
            series[spec.name].append(
                (r["effectiveDateTime"], to_canonical(spec, float(q["value"]), q["code"]))
            )
        elif r["resourceType"] == "DocumentReference":
            data = r["content"][0]["attachment"]["data"]
            texts.append((r["date"], base64.b64decode(data).decode("utf-8")))
    feats: list[float] = []
    for s in LABS:
        vals = [v for _, v in sorted(series[s.name])]
        if not vals:
            feats += [math.nan] * len(LAB_STATS)
            continue
        # log of skewed analytes keeps a linear model honest about orders of magnitude
        tr = (
            (lambda v: v)
            if s.name in ("spo2", "temperature")
            else (lambda v: math.log(max(v, 1e-4)))
        )
        feats += [tr(vals[0]), tr(max(vals)), tr(min(vals)), tr(vals[-1])]
    return np.array(feats, dtype=np.float64), "\n".join(t for _, t in sorted(texts))


def load_cohort(out: Path, image_size: int = 32) -> CohortData:
    rows = json.loads((out / "labels.json").read_text(encoding="utf-8"))
    labs, texts, pixels = [], [], []
    for r in rows:
        key = r["patient_key"]
        bundle = json.loads((out / "bundles" / f"{key}.json").read_text(encoding="utf-8"))
        f, t = _bundle_features(bundle)
        labs.append(f)
        texts.append(t)
        pixels.append(
            read_image(out / "dicom" / key / f"{r['sop_uids'][0]}.dcm", image_size).ravel()
        )
    return CohortData(
        keys=[r["patient_key"] for r in rows],
        sites=np.array([r["site"] for r in rows]),
        noisy={f: np.array([r[f] for r in rows]) for f in SYNTH_FINDINGS},
        truth={f: np.array([r[f"true_{f}"] for r in rows]) for f in SYNTH_FINDINGS},
        labs=np.vstack(labs),
        texts=texts,
        pixels=np.vstack(pixels),
    )


def _model(modality: str) -> Pipeline:
    if modality == "labs":
        return make_pipeline(
            SimpleImputer(strategy="median", add_indicator=True),
            StandardScaler(),
            LogisticRegression(C=0.5, max_iter=3000),
        )
    if modality == "text":
        return make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
            LogisticRegression(C=4.0, max_iter=3000),
        )
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.005, max_iter=3000))


def _inputs(d: CohortData, modality: str, idx: np.ndarray) -> Any:
    if modality == "labs":
        return d.labs[idx]
    if modality == "text":
        return [d.texts[i] for i in idx]
    return d.pixels[idx]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    out: np.ndarray = np.log(p / (1 - p))
    return out


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def evaluate(d: CohortData, seed: int = 0) -> ReferenceResult:
    """Per finding: AUROC of each single-modality model and of the stacked fusion."""
    n = len(d.keys)
    strat = np.array([d.sites[i] + str(d.truth["pneumonia"][i]) for i in range(n)])
    train, test = train_test_split(np.arange(n), test_size=0.5, random_state=seed, stratify=strat)
    result = ReferenceResult(auroc={}, n_train=len(train), n_test=len(test))
    for f in SYNTH_FINDINGS:
        y_tr, y_te = d.noisy[f][train], d.truth[f][test]
        folds = StratifiedKFold(5, shuffle=True, random_state=seed)
        oof, held = [], []
        row: dict[str, float] = {}
        for m in MODALITIES:
            model = _model(m)
            oof.append(
                _logit(
                    cross_val_predict(
                        model, _inputs(d, m, train), y_tr, cv=folds, method="predict_proba"
                    )[:, 1]
                )
            )
            model.fit(_inputs(d, m, train), y_tr)
            p = model.predict_proba(_inputs(d, m, test))[:, 1]
            held.append(_logit(p))
            row[m] = _auc(y_te, p)
        meta = LogisticRegression(C=1.0, max_iter=1000).fit(np.column_stack(oof), y_tr)
        row["all"] = _auc(y_te, meta.predict_proba(np.column_stack(held))[:, 1])
        result.auroc[f] = row
    return result


def site_shift(
    d: CohortData, train_site: str, test_site: str, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Image model trained on half of ``train_site``: AUROC there (held out) and at the other."""
    a = np.flatnonzero(d.sites == train_site)
    b = np.flatnonzero(d.sites == test_site)
    a_tr, a_te = train_test_split(a, test_size=0.5, random_state=seed)
    out: dict[str, dict[str, float]] = {}
    for f in SYNTH_FINDINGS:
        model = _model("image").fit(d.pixels[a_tr], d.noisy[f][a_tr])
        out[f] = {
            f"{train_site}->{train_site}": _auc(
                d.truth[f][a_te], model.predict_proba(d.pixels[a_te])[:, 1]
            ),
            f"{train_site}->{test_site}": _auc(
                d.truth[f][b], model.predict_proba(d.pixels[b])[:, 1]
            ),
        }
    return out


NOTE = (
    "Pneumonia and heart failure are built to need fusion: each shows on the image, in the "
    "notes and in the labs only for an independent part of the patients, and look-alike "
    "conditions (other infections, COPD, CKD) put the same symptoms and lab changes into "
    "patients without them; atelectasis or scarring (more often with COPD, smoking or a "
    "malignancy) puts a pneumonia-like opacity on the radiographs of patients without "
    "pneumonia. Pleural effusion is image-led by design; pneumothorax shows on the "
    "image and in the notes (sudden pleuritic pain, absent breath sounds), SpO2 adds a little. "
    "The image column is a linear model on 32x32 pixels: a floor, not a ceiling."
)


def markdown(res: ReferenceResult, command: str, extra: str = "") -> str:
    lines = [
        "# Reference models on the synthetic cohort",
        "",
        f"Produced by `{command}`. Logistic regression on one half "
        f"({res.n_train} patients), AUROC on the other ({res.n_test}) against the "
        "noise-free labels. `all` stacks the three single-modality probabilities "
        "(out-of-fold on the training half).",
        "",
        "| finding | labs | text | image | all | best single | gain |",
        "|---|---|---|---|---|---|---|",
    ]
    for f, row in res.auroc.items():
        m, best = res.best_single(f)
        lines.append(
            f"| {f} | {row['labs']:.3f} | {row['text']:.3f} | {row['image']:.3f} | "
            f"{row['all']:.3f} | {m} | {row['all'] - best:+.3f} |"
        )
    if res.site_shift:
        cols = list(next(iter(res.site_shift.values())))
        lines += [
            "",
            "Site shift: image model trained on one site, scored on held-out "
            "patients of that site and on the other site.",
            "",
            f"| finding | {' | '.join(cols)} | loss |",
            "|---|---|---|---|",
        ]
        for f, r in res.site_shift.items():
            v = list(r.values())
            lines.append(f"| {f} | {v[0]:.3f} | {v[1]:.3f} | {v[0] - v[1]:+.3f} |")
    lines += ["", NOTE]
    return "\n".join(lines) + ("\n\n" + extra if extra else "") + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patients", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--label-noise", type=float, default=0.0)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    from mmcds.synth.cohort import generate_cohort

    summary = generate_cohort(args.out, args.patients, args.seed, ("A", "B"), args.label_noise)
    t0 = time.perf_counter()
    data = load_cohort(args.out)
    res = evaluate(data, seed=args.seed)
    res.site_shift = site_shift(data, "A", "B", seed=args.seed)
    command = (
        f"python -m mmcds.synth.reference --patients {args.patients} --seed {args.seed}"
        f" --label-noise {args.label_noise} --out DIR"
    )
    extra = (
        f"Generation: {summary.patients} patients in {summary.seconds:.1f} s "
        f"({summary.patients_per_second:.1f} patients/s, one process); reference models "
        f"{time.perf_counter() - t0:.1f} s. Prevalence per site: "
        f"`{json.dumps(summary.prevalence)}`."
    )
    text = markdown(res, command, extra)
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
