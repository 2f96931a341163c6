"""Out-of-distribution detection: is this patient's input like what the model was validated on?

A model trained at one hospital is not validated on another's scanners, note templates or lab
panels (DESIGN §8). At training one detector per modality is fitted on the training split and
its limit set on the validation split; at service an input beyond the limit makes the findings
abstain, with the reason in words. Two kinds of check per modality:

- readable facts first: image modality, size and DICOM bit depth against the training images,
  each lab's value against the values it took in training, with a margin (a reason a clinician
  can check);
- the embedding: a Gaussian (principal subspace + isotropic residual, i.e. probabilistic PCA)
  fitted on the training split's embeddings; the score is the Mahalanobis distance in the
  subspace plus the scaled residual, a patient's score is the worst of their vectors (one per
  image), and the limit is a high quantile of the validation patients' scores (``QUANTILE``)
  times a margin, so well under 1 in 200 in-distribution patients abstains per modality.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors.numpy import load_file, save_file

from mmcds.records import Encodings, PatientRecord

OOD_JSON = "ood.json"
OOD_WEIGHTS = "ood.safetensors"
QUANTILE = 0.995
#: The limit is this many times the validation quantile: a few hundred validation patients
#: put the quantile near their maximum, and an in-distribution patient just past it is noise,
#: not another hospital (measured: docs/results/figures.md, "Abstention").
LIMIT_MARGIN = 1.5
COMPONENTS = 16
#: How far beyond the training range a lab value may go before it is "outside": a factor for a
#: lab whose training values are all positive (most are, and their tails are log-normal:
#: procalcitonin and NT-proBNP of ordinary test patients went past a linear margin on 3 in 200,
#: issue 21), a share of the range otherwise. Either still catches a unit error (°F for °C is
#: ×2.5, WBC per µL for 10⁹/L ×1000).
RANGE_FACTOR = 2.0
RANGE_MARGIN = 0.5
SIZE_MARGIN = 1.5

MODALITY_WORDS = {"image": "imaging", "text": "notes", "labs": "labs"}


@dataclass
class Gaussian:
    """Probabilistic PCA of one modality's embeddings."""

    mean: np.ndarray
    components: np.ndarray  # (k, D), orthonormal rows
    variances: np.ndarray  # (k,)
    residual_variance: float

    @classmethod
    def fit(cls, x: np.ndarray, k: int = COMPONENTS) -> Gaussian:
        x = np.asarray(x, np.float64)
        mean = x.mean(axis=0)
        xc = x - mean
        k = max(1, min(k, len(x) - 1, x.shape[1]))
        _, s, vt = np.linalg.svd(xc, full_matrices=False)
        var = s**2 / max(1, len(x) - 1)
        rest = var[k:]
        residual = float(rest.mean()) if len(rest) else float(var[-1])
        return cls(mean, vt[:k], np.maximum(var[:k], 1e-12), max(residual, 1e-12))

    def score(self, x: np.ndarray) -> np.ndarray:
        xc = np.atleast_2d(np.asarray(x, np.float64)) - self.mean
        proj = xc @ self.components.T
        maha = (proj**2 / self.variances).sum(axis=1)
        resid = ((xc - proj @ self.components) ** 2).sum(axis=1)
        return np.asarray(maha + resid / self.residual_variance)


def _text_vector(enc: Encodings) -> np.ndarray | None:
    text = enc.by_modality.get("text")
    return None if text is None or not len(text.tokens) else text.tokens.mean(axis=0)


def _labs_vector(enc: Encodings) -> np.ndarray | None:
    """Mean and maximum over the lab tokens: a fixed width whatever labs were measured (each
    token carries which lab it is, so the pattern of tests survives the pooling)."""
    labs = enc.by_modality.get("labs")
    if labs is None or not len(labs.tokens):
        return None
    return np.concatenate([labs.tokens.mean(axis=0), labs.tokens.max(axis=0)])


def _image_vectors(enc: Encodings) -> np.ndarray | None:
    image = enc.by_modality.get("image")
    return None if image is None or not len(image.tokens) else image.tokens


def _vectors(modality: str, items: Sequence[Encodings]) -> np.ndarray:
    rows: list[np.ndarray] = []
    for enc in items:
        if modality == "image":
            v = _image_vectors(enc)
            if v is not None:
                rows.extend(v)
        else:
            w = _text_vector(enc) if modality == "text" else _labs_vector(enc)
            if w is not None:
                rows.append(w)
    return np.asarray(rows, np.float64)


def patient_scores(g: Gaussian, modality: str, items: Sequence[Encodings]) -> np.ndarray:
    """One score per patient who has the modality: the worst of their vectors, the statistic
    ``OodDetector.check`` compares with the limit. A limit set on single images instead would
    be crossed by a patient with several images several times as often as its quantile says
    (measured: 3% abstention with all inputs, 1% without the image, issue 21)."""
    scores = [g.score(v).max() for enc in items if len(v := _vectors(modality, [enc]))]
    return np.asarray(scores, np.float64)


@dataclass
class OodDetector:
    gaussians: dict[str, Gaussian] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)
    image_modalities: list[str] = field(default_factory=list)
    image_sides: tuple[int, int] = (0, 0)  # shortest and longest side seen in training
    image_bits: list[int] = field(default_factory=list)  # DICOM BitsStored seen in training
    lab_ranges: dict[str, tuple[float, float, str]] = field(default_factory=dict)

    # --- training ------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        train: Sequence[Encodings],
        val: Sequence[Encodings],
        train_records: Sequence[PatientRecord],
    ) -> OodDetector:
        det = cls()
        for modality in ("image", "text", "labs"):
            x = _vectors(modality, train)
            v = _vectors(modality, val)
            if len(x) < 10 or len(v) < 5:
                continue
            g = Gaussian.fit(x)
            det.gaussians[modality] = g
            det.limits[modality] = LIMIT_MARGIN * float(
                np.quantile(patient_scores(g, modality, val), QUANTILE)
            )
        images = [img for r in train_records for img in r.images]
        det.image_modalities = sorted({img.modality for img in images if img.modality})
        det.image_bits = sorted({img.bits_stored for img in images if img.bits_stored})
        if images:
            sides = [s for img in images for s in img.pixels.shape[:2]]
            det.image_sides = (int(min(sides)), int(max(sides)))
        labs = [r.labs for r in train_records if not r.labs.empty]
        if labs:
            frame = pd.concat(labs, ignore_index=True)
            for name, rows in frame.dropna(subset=["name"]).groupby("name"):
                values = rows["value"].astype(float).dropna()
                if len(values) >= 10:
                    lo, hi = float(values.min()), float(values.max())
                    unit = str(rows["unit"].iloc[0])
                    det.lab_ranges[str(name)] = (float(lo), float(hi), unit)
        return det

    # --- service -------------------------------------------------------------------------------

    def check(self, record: PatientRecord, encodings: Encodings) -> dict[str, str]:
        """Per modality found outside, the reason in words; empty when all is inside."""
        out: dict[str, str] = {}
        image = self._image_reason(record)
        if image:
            out["image"] = image
        lab = self._lab_reason(record)
        if lab:
            out["labs"] = lab
        for modality, g in self.gaussians.items():
            if modality in out or modality not in encodings.by_modality:
                continue
            v = _vectors(modality, [encodings])
            if not len(v) or v.shape[1] != g.mean.shape[0]:
                continue
            ratio = float(g.score(v).max()) / self.limits[modality]
            if ratio > 1.0:
                out[modality] = (
                    f"{MODALITY_WORDS[modality]} unlike the training patients' "
                    f"({ratio:.2f}× the validated limit)"
                )
        return out

    def _image_reason(self, record: PatientRecord) -> str | None:
        lo, hi = self.image_sides
        for img in record.images:
            if self.image_modalities and img.modality and img.modality not in self.image_modalities:
                return (
                    f"image modality {img.modality}; the model saw "
                    f"{', '.join(self.image_modalities)}"
                )
            # another detector's bit depth: its grey levels were never seen, whatever the
            # embedding distance says (site C's 16-bit images got within the limit, issue 21)
            if self.image_bits and img.bits_stored and img.bits_stored not in self.image_bits:
                seen = ", ".join(str(b) for b in self.image_bits)
                return f"image stored with {img.bits_stored} bits; the model saw {seen}-bit images"
            if hi and (
                max(img.pixels.shape[:2]) > hi * SIZE_MARGIN
                or min(img.pixels.shape[:2]) < lo / SIZE_MARGIN
            ):
                h, w = img.pixels.shape[:2]
                return f"image of {w} × {h} px; the model saw {lo}–{hi} px a side"
        return None

    def _lab_reason(self, record: PatientRecord) -> str | None:
        if record.labs.empty or not self.lab_ranges:
            return None
        labs = record.labs
        for name, raw in zip(labs["name"], pd.to_numeric(labs["value"]), strict=True):
            rng = self.lab_ranges.get(str(name))
            if rng is None or pd.isna(raw):
                continue
            lo, hi, unit = rng
            value = float(raw)
            if lo > 0:
                outside = value < lo / RANGE_FACTOR or value > hi * RANGE_FACTOR
            else:
                outside = abs(value - (lo + hi) / 2) > (0.5 + RANGE_MARGIN) * (hi - lo)
            if outside:
                return (
                    f"{name} {value:.3g} {unit} far outside the training values "
                    f"{lo:.3g}–{hi:.3g} {unit}"
                )
        return None

    # --- files ---------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        arrays: dict[str, np.ndarray] = {}
        for m, g in self.gaussians.items():
            arrays[f"{m}.mean"] = g.mean
            arrays[f"{m}.components"] = g.components
            arrays[f"{m}.variances"] = g.variances
        if arrays:
            save_file(arrays, str(folder / OOD_WEIGHTS))
        meta: dict[str, Any] = {
            "limits": self.limits,
            "residual_variance": {m: g.residual_variance for m, g in self.gaussians.items()},
            "quantile": QUANTILE,
            "image_modalities": self.image_modalities,
            "image_sides": list(self.image_sides),
            "image_bits": self.image_bits,
            "lab_ranges": {k: list(v) for k, v in self.lab_ranges.items()},
        }
        (folder / OOD_JSON).write_text(json.dumps(meta, indent=1, sort_keys=True))

    @classmethod
    def load(cls, folder: Path) -> OodDetector | None:
        """The detector saved beside a model, or None for a model trained without one."""
        if not (folder / OOD_JSON).is_file():
            return None
        meta = json.loads((folder / OOD_JSON).read_text())
        arrays = load_file(str(folder / OOD_WEIGHTS)) if (folder / OOD_WEIGHTS).is_file() else {}
        gaussians = {
            m: Gaussian(
                arrays[f"{m}.mean"],
                arrays[f"{m}.components"],
                arrays[f"{m}.variances"],
                float(r),
            )
            for m, r in meta["residual_variance"].items()
        }
        sides = meta.get("image_sides", (0, 0))
        return cls(
            gaussians=gaussians,
            limits={k: float(v) for k, v in meta["limits"].items()},
            image_modalities=list(meta.get("image_modalities", [])),
            image_sides=(int(sides[0]), int(sides[1])),
            image_bits=[int(b) for b in meta.get("image_bits", [])],
            lab_ranges={
                k: (float(v[0]), float(v[1]), str(v[2])) for k, v in meta["lab_ranges"].items()
            },
        )
