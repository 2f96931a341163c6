"""A cohort as arrays the fusion stages share: encodings, labels, sites, subgroups, splits.

The split is by patient, stratified by site and fixed by the seed; the test split is never seen
by pre-training, training, early stopping or calibration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mmcds.records import Encodings

SPLITS = ("train", "val", "test")
#: A label that is not known (uncertain under ``mmcds label --uncertain ignore``): masked out of
#: the loss, and its patient left out of that finding's calibration, thresholds and figures
#: (``mmcds.fusion.metrics.known``), never counted as a negative.
UNKNOWN = -1
#: A finding with fewer positives than this in the training split gets a warning in the model
#: card and the validation record: its model rests on few examples, and its validation figures
#: on fewer still (their bootstrap CIs say how few).
FEW_POSITIVES = 30


@dataclass
class EncodedSet:
    """Per patient, in the same order: encodings, labels (N, F: 1, 0 or ``UNKNOWN``) and who
    they are."""

    keys: list[str]
    encodings: list[Encodings]
    labels: np.ndarray
    findings: list[str]
    sites: list[str | None] = field(default_factory=list)
    sex: list[str | None] = field(default_factory=list)
    age_band: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, index: Sequence[int] | np.ndarray) -> EncodedSet:
        idx = [int(i) for i in index]
        return EncodedSet(
            keys=[self.keys[i] for i in idx],
            encodings=[self.encodings[i] for i in idx],
            labels=self.labels[idx],
            findings=list(self.findings),
            sites=[self.sites[i] for i in idx],
            sex=[self.sex[i] for i in idx],
            age_band=[self.age_band[i] for i in idx],
        )

    def select_keys(self, keys: Iterable[str]) -> EncodedSet:
        where = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in where]
        if missing:
            raise KeyError(f"{len(missing)} patient(s) not in this set, e.g. {missing[0]}")
        return self.subset([where[k] for k in keys])


def positives(ds: EncodedSet) -> dict[str, int]:
    """Patients with each finding (label 1)."""
    return {f: int((ds.labels[:, j] == 1).sum()) for j, f in enumerate(ds.findings)}


def few_positive_warnings(train: dict[str, int], val: dict[str, int]) -> dict[str, str]:
    """Per finding with fewer than ``FEW_POSITIVES`` training positives, the warning to show."""
    return {
        f: (
            f"only {n} positive patients in training ({val.get(f, 0)} in validation; fewer "
            f"than {FEW_POSITIVES}): its figures are uncertain, read them with their 95% CI"
        )
        for f, n in train.items()
        if n < FEW_POSITIVES
    }


def split_patients(
    keys: Sequence[str],
    sites: Sequence[str | None],
    seed: int,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> dict[str, list[str]]:
    """Patient-level train/val/test split, stratified by site, deterministic from ``seed``.

    Within a site the keys are sorted, then shuffled by the seed, so the split does not depend on
    the order of the labels file.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"split fractions must be positive and sum to 1, got {fractions}")
    if len(set(keys)) != len(keys):
        raise ValueError("patient keys must be unique: a patient may sit in one split only")
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    by_site: dict[str, list[str]] = {}
    for k, s in zip(keys, sites, strict=True):
        by_site.setdefault(s or "", []).append(k)
    for site in sorted(by_site):
        group = sorted(by_site[site])
        site_seed = int(hashlib.sha256(f"{seed}|{site}".encode()).hexdigest()[:8], 16)
        order = np.random.default_rng(site_seed).permutation(len(group))
        n_train = int(round(fractions[0] * len(group)))
        n_val = int(round(fractions[1] * len(group)))
        for rank, i in enumerate(order):
            name = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
            out[name].append(group[i])
    for s in SPLITS:
        out[s].sort()
    return out


def restrict_training(
    split: dict[str, list[str]],
    keys: Sequence[str],
    sites: Sequence[str | None],
    train_sites: Sequence[str],
) -> dict[str, list[str]]:
    """The split of a model trained at ``train_sites`` only and deployed at every site.

    ``train`` and ``val`` keep only those sites' patients: the developer trains, stops early and
    calibrates at home. The other sites' training and validation patients go to ``unused``
    (neither trained on nor scored); a deployment site is calibrated on its own patients with
    ``mmcds calibrate``. ``test`` (every site) is untouched, so the shift can be measured.
    """
    site_of = dict(zip(keys, sites, strict=True))
    known = sorted({s for s in sites if s})
    wanted = set(train_sites)
    if not wanted or not wanted <= set(known):
        raise ValueError(f"train sites {sorted(wanted)} must be among the cohort's sites {known}")
    home = {name: [k for k in split[name] if site_of[k] in wanted] for name in ("train", "val")}
    if not home["train"] or not home["val"]:
        raise ValueError(f"sites {sorted(wanted)} have no training or no validation patients")
    away = [k for name in ("train", "val") for k in split[name] if site_of[k] not in wanted]
    return {**home, "test": list(split["test"]), "unused": sorted(away)}


def split_hash(split: dict[str, list[str]]) -> str:
    text = "|".join(f"{s}:{','.join(split[s])}" for s in SPLITS)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
