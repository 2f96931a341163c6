"""The lexical path: TF-IDF + logistic regression over a patient's notes, one input of the
fusion model's text head.

Frozen MiniLM chunk embeddings lost to a plain TF-IDF + logistic regression on notes-only
cohorts (heart failure, -0.087 AUROC on a fresh cohort): a mean-pooled sentence embedding blurs
the few words that carry a finding ("BNP", "bilateral effusions", "no pneumothorax"), and a
few hundred patients cannot teach an attention layer to recover them. So the model stacks: per
finding a TF-IDF + L2 logistic regression fitted on the training split gives a logit, and the
fusion model adds it, scaled per finding, to its text head whenever notes are present (masked
with them: absent or dropped notes add nothing). The fusion model learns from *out-of-fold*
logits on its training patients (each patient's logit from a regression that never saw it),
otherwise it would learn to trust in-sample scores that no new patient gets; validation, test
and the service get the regression fitted on the whole training split.

Saved beside the fusion checkpoint as ``lexical.json`` (settings, vocabulary, what was fitted)
and ``lexical.safetensors`` (idf, coefficients, intercepts): data, never a pickle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from safetensors.numpy import load_file, save_file
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from mmcds.records import Encodings, Note

CONFIG_NAME = "lexical.json"
WEIGHTS_NAME = "lexical.safetensors"
NGRAMS = (1, 2)
MIN_DF = 2
FOLDS = 5  # for C (inside the training split) and for the out-of-fold logits
CS = 8
METHOD = "TF-IDF (word 1-2-grams, sublinear tf, min_df 2) + L2 logistic regression, C by 5-fold CV"


def note_text(notes: Sequence[Note]) -> str:
    """Everything the patient's notes say, in one document."""
    return "\n\n".join(n.text for n in notes)


def vectoriser() -> TfidfVectorizer:
    return TfidfVectorizer(ngram_range=NGRAMS, sublinear_tf=True, min_df=MIN_DF)


def regression(y: np.ndarray) -> LogisticRegression | LogisticRegressionCV:
    """C chosen by stratified CV on the given patients; with too few of a class for CV, C=1."""
    folds = min(FOLDS, int(y.sum()), int((1 - y).sum()))
    if folds < 2:
        return LogisticRegression(C=1.0, max_iter=2000)
    return LogisticRegressionCV(
        Cs=CS, cv=folds, scoring="roc_auc", max_iter=2000, l1_ratios=(0.0,),
        use_legacy_attributes=False,
    )  # fmt: skip


def _c(lr: LogisticRegression | LogisticRegressionCV) -> float:
    return float(lr.C_ if isinstance(lr, LogisticRegressionCV) else lr.C)


@dataclass
class LexicalPath:
    """A fitted TF-IDF vocabulary and, per finding, a linear logit over it."""

    findings: list[str]
    terms: list[str]  # column j of the features is terms[j]
    idf: np.ndarray  # (V,)
    coef: np.ndarray  # (F, V)
    intercept: np.ndarray  # (F,)
    fitted: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._counter = CountVectorizer(ngram_range=NGRAMS, vocabulary=self.terms)

    def counts(self, texts: Sequence[str]) -> sp.csr_matrix:
        """Raw term counts (N, V) over the fitted vocabulary."""
        return sp.csr_matrix(self._counter.transform(list(texts)), dtype=np.float64)

    def tfidf(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        """What ``TfidfVectorizer(sublinear_tf=True)`` computes from counts: 1 + log tf, times
        idf, rows L2-normalised."""
        x = counts.copy()
        x.data = 1.0 + np.log(x.data)
        return sp.csr_matrix(normalize(x @ sp.diags(self.idf), norm="l2"))

    def logits_from_counts(self, counts: sp.csr_matrix) -> np.ndarray:
        z = self.tfidf(counts) @ self.coef.T + self.intercept
        return np.asarray(z, np.float64)

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """(N, F) logits of the regression fitted on the whole training split."""
        return self.logits_from_counts(self.counts(texts))

    def summary(self) -> dict[str, Any]:
        """What ``FusionConfig.lexical`` records (the arrays stay in the files)."""
        return {"method": METHOD, "vocabulary": len(self.terms), **self.fitted}

    def save(self, folder: Path) -> None:
        meta = {"findings": self.findings, "terms": self.terms, "fitted": self.fitted}
        (folder / CONFIG_NAME).write_text(json.dumps(meta))
        arrays = {"idf": self.idf, "coef": self.coef, "intercept": self.intercept}
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, folder / WEIGHTS_NAME)

    @classmethod
    def load(cls, folder: Path) -> LexicalPath:
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{folder}: the model has a lexical path but {CONFIG_NAME} or {WEIGHTS_NAME} is "
                "missing: copy the whole model folder"
            )
        meta = json.loads((folder / CONFIG_NAME).read_text())
        arrays = load_file(folder / WEIGHTS_NAME)
        return cls(
            meta["findings"], meta["terms"], arrays["idf"], arrays["coef"], arrays["intercept"],
            meta["fitted"],
        )  # fmt: skip


def _fit(
    texts: Sequence[str], labels: np.ndarray, findings: Sequence[str], cs: Sequence[float] | None
) -> LexicalPath:
    """Vocabulary and idf from ``texts``; per finding a regression on its known labels (C by
    CV, or ``cs[j]`` when given). A finding with one class only gets a constant logit."""
    vec = vectoriser().fit(texts)
    terms = [t for t, _ in sorted(vec.vocabulary_.items(), key=lambda kv: kv[1])]
    path = LexicalPath(list(findings), terms, vec.idf_.astype(np.float64), np.zeros(0), np.zeros(0))
    x = path.tfidf(path.counts(texts))
    coef = np.zeros((len(findings), len(terms)))
    intercept = np.zeros(len(findings))
    per: dict[str, dict[str, Any]] = {}
    for j, f in enumerate(findings):
        known = np.isin(labels[:, j], (0, 1))
        y = labels[known, j].astype(int)
        info: dict[str, Any] = {"patients": int(known.sum()), "positives": int(y.sum())}
        if y.min(initial=1) == y.max(initial=0):
            rate = float(np.clip(y.mean() if len(y) else 0.5, 1e-3, 1 - 1e-3))
            intercept[j] = np.log(rate / (1 - rate))
            info["skipped"] = "one class only: a constant logit"
        else:
            lr = (LogisticRegression(C=cs[j], max_iter=2000) if cs else regression(y)).fit(
                x[known], y
            )
            coef[j], intercept[j] = lr.coef_[0], lr.intercept_[0]
            info["C"] = _c(lr)
        per[f] = info
    path.coef, path.intercept = coef, intercept
    path.fitted = {"patients": len(texts), "findings": per}
    return path


def fit_lexical(
    texts: Sequence[str], labels: np.ndarray, findings: Sequence[str], seed: int = 0
) -> tuple[LexicalPath, np.ndarray]:
    """The path fitted on these (training) patients, and their out-of-fold logits (N, F).

    Each patient's out-of-fold logit comes from a vocabulary and regressions fitted on the other
    folds, with the C chosen on the whole split (so C saw every patient; the weights did not).
    ``labels``: 1/0, anything else unknown (left out of that finding's regression)."""
    full = _standardised(_fit(texts, labels, findings, None), texts)
    cs = [float(full.fitted["findings"][f].get("C", 1.0)) for f in findings]
    oof = np.zeros((len(texts), len(findings)))
    folds = KFold(n_splits=min(FOLDS, len(texts)), shuffle=True, random_state=seed)
    for inside, outside in folds.split(np.arange(len(texts))):
        mine = [texts[i] for i in inside]
        part = _standardised(_fit(mine, labels[inside], findings, cs), mine)
        oof[outside] = part.logits([texts[i] for i in outside])
    full.fitted["out_of_fold"] = f"{folds.get_n_splits()}-fold, seed {seed}"
    _platt(full, oof, labels)
    return full, oof


def _standardised(path: LexicalPath, texts: Sequence[str]) -> LexicalPath:
    """The path with each finding's logit centred and scaled by its spread over the patients it
    was fitted on. C is chosen for AUROC, which a strong penalty often ties with a weak one: the
    raw logits then differ by hundredths, and the intercept of each fold's fit (which follows
    the fold's prevalence) outweighs them, so out-of-fold logits from different folds would not
    be comparable (held-out positives meet a fold with fewer positives: a lower intercept)."""
    z = path.logits(texts)
    centre, spread = z.mean(axis=0), np.maximum(z.std(axis=0), 1e-12)
    path.coef = path.coef / spread[:, None]
    path.intercept = (path.intercept - centre) / spread
    return path


def _platt(path: LexicalPath, oof: np.ndarray, labels: np.ndarray) -> None:
    """Rescale each finding's logits (in place, ``oof`` too) by a Platt fit of its out-of-fold
    logits, so the fusion model, which starts from the lexical logit as it is (scale 1), gets
    one on the scale of a probability. A negative slope (out of fold the words rank patients
    the wrong way round) is no signal to learn from: slope 0, the finding's prevalence.
    Folded into the weights, the path stays linear."""
    for j, f in enumerate(path.findings):
        known = np.isin(labels[:, j], (0, 1))
        y = labels[known, j].astype(int)
        if y.min(initial=1) == y.max(initial=0):
            continue
        fit = LogisticRegression(C=1e4, max_iter=1000).fit(oof[known, j : j + 1], y)
        a, b = float(fit.coef_[0, 0]), float(fit.intercept_[0])
        if a <= 0:
            a, b = 0.0, float(np.log(y.mean() / (1 - y.mean())))
        path.coef[j] *= a
        path.intercept[j] = a * path.intercept[j] + b
        oof[:, j] = a * oof[:, j] + b
        path.fitted["findings"][f]["platt"] = [round(a, 4), round(b, 4)]


def use_out_of_fold(encodings: Sequence[Encodings], oof: np.ndarray) -> None:
    """Put the training patients' out-of-fold logits (rows of ``oof``, same order) in place of
    the whole-split fit's, which the pipeline computed (patients without notes have none)."""
    for enc, z in zip(encodings, oof, strict=True):
        text = enc.by_modality.get("text")
        if text is not None:
            text.lexical = np.asarray(z, np.float64)
