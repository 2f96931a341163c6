"""Generate the cohort: latent patients -> bundles, DICOM, masks, labels, summary.

Layout under ``out``::

    bundles/<patient_key>.json          one FHIR R4 transaction Bundle per patient
    dicom/<patient_key>/<sop_uid>.dcm   the chest radiograph
    masks/<patient_key>/<sop_uid>_<finding>.png   uint8 0/255 lesion mask, same grid
    labels.csv, labels.json             the truth (never inside the FHIR data)
    cohort.json                         seed, arguments, version, counts, prevalence per site

Label columns: patient_key, site, sex, age, age_band, one 0/1 column per finding (with label
noise if asked) and ``no_finding``, the same as ``true_<finding>`` / ``true_no_finding``
(noise-free), study_uid, sop_uids, view, ``mask_<finding>`` (path relative to ``out``, empty
when absent), mask_paths, cardiothoracic_ratio. Lists are ``;``-joined in the CSV and JSON
arrays in labels.json, which also carries ``evidence`` (per present finding: severity, image
visibility, whether the notes / labs express it) and ``comorbid`` for analysis.

Every random draw comes from ``SeedSequence(seed, spawn_key=(patient_index,))`` split into one
stream per modality, so patient *i* is the same whatever the cohort size and a change in, say,
the notes grammar leaves the images alone. Nothing reads the wall clock.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from mmcds.findings import SYNTH_FINDINGS
from mmcds.synth import anatomy, image
from mmcds.synth.fhir import StudyRef, build_bundle
from mmcds.synth.ids import accession, dicom_uid
from mmcds.synth.labs import draw_labs
from mmcds.synth.latent import LatentPatient, sample_patient
from mmcds.synth.notes import write_notes
from mmcds.synth.sites import site_profile

GENERATOR_VERSION = "mmcds-synth/1.1"  # 1.1: heart failure shows on 80% of radiographs
LAYOUT_DIRS = ("bundles", "dicom", "masks")


@dataclass
class CohortSummary:
    out: Path
    seed: int
    patients: int
    sites: list[str]
    label_noise: float
    counts: dict[str, int] = field(default_factory=dict)
    prevalence: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> finding
    seconds: float = 0.0  # wall time; reported, never written into the cohort files

    @property
    def patients_per_second(self) -> float:
        return self.patients / self.seconds if self.seconds > 0 else float("inf")


def patient_key(seed: int, index: int) -> str:
    return f"synth-{seed}-{index:05d}"


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / "cohort.json").exists():
        raise FileExistsError(
            f"{out} is not empty and holds no cohort.json: refusing to write a cohort over "
            "other files; pass an empty or new directory"
        )
    for d in LAYOUT_DIRS:  # a previous cohort here: replace it wholly, no stale patients
        shutil.rmtree(out / d, ignore_errors=True)
    for name in ("labels.csv", "labels.json", "cohort.json"):
        (out / name).unlink(missing_ok=True)
    (out / "bundles").mkdir(parents=True, exist_ok=True)


def noisy_labels(p: LatentPatient, noise: float, rng: np.random.Generator) -> dict[str, int]:
    """Reader disagreement: subtle positives are missed more often than plain ones.

    A present finding is flipped with chance ``noise * (1.5 - visibility)``, an absent one with
    ``noise / 2``. The draws happen whatever ``noise`` is, so the cohort does not depend on it.
    """
    u = rng.random(len(SYNTH_FINDINGS))
    out: dict[str, int] = {}
    for f, r in zip(SYNTH_FINDINGS, u, strict=True):
        truth = p.findings[f]
        flip = noise * (1.5 - p.image_visibility[f]) if truth else noise / 2
        out[f] = int(truth != (r < flip))
    return out


def _one_patient(out: Path, seed: int, index: int, site_name: str, noise: float) -> dict[str, Any]:
    streams = [
        np.random.default_rng(s) for s in np.random.SeedSequence(seed, spawn_key=(index,)).spawn(5)
    ]
    r_latent, r_image, r_labs, r_notes, r_noise = streams
    key = patient_key(seed, index)
    p = sample_patient(r_latent, index, key, site_profile(site_name), seed)

    drawing = anatomy.draw(p, r_image)
    stored = image.render(drawing, p.site, r_image)
    view = "AP" if r_image.random() < 0.12 + 0.12 * (not p.none) else "PA"  # portable films
    uids = image.ImageUIDs(
        study=dicom_uid(seed, key, "study"),
        series=dicom_uid(seed, key, "series", 1),
        sop=dicom_uid(seed, key, "sop", 1, 1),
        frame_of_reference=dicom_uid(seed, key, "for"),
        accession=accession(seed, key),
    )
    acquired = p.admit + timedelta(minutes=int(r_image.integers(20, 240)))
    ds = image.build_dataset(stored, p, uids, acquired, view)
    image.write_dicom(out / "dicom" / key / f"{uids.sop}.dcm", ds)
    mask_paths: dict[str, str] = {}
    for f, m in drawing.masks.items():
        rel = f"masks/{key}/{uids.sop}_{f}.png"
        image.write_mask(out / rel, m)
        mask_paths[f] = rel

    labs = draw_labs(p, r_labs)
    notes = write_notes(p, r_notes)
    bundle = build_bundle(p, seed, labs, notes, StudyRef(uids, acquired, p.site.modality, view))
    (out / "bundles" / f"{key}.json").write_text(
        json.dumps(bundle, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
    )

    noisy = noisy_labels(p, noise, r_noise)
    row: dict[str, Any] = {
        "patient_key": key,
        "site": p.site.name,
        "sex": p.sex,
        "age": p.age,
        "age_band": p.age_band,
    }
    row.update(noisy)
    row["no_finding"] = int(not any(noisy.values()))
    row.update({f"true_{f}": int(p.findings[f]) for f in SYNTH_FINDINGS})
    row["true_no_finding"] = int(p.none)
    row["study_uid"] = uids.study
    row["sop_uids"] = [uids.sop]
    row["view"] = view
    row.update({f"mask_{f}": mask_paths.get(f, "") for f in SYNTH_FINDINGS})
    row["mask_paths"] = [mask_paths[f] for f in SYNTH_FINDINGS if f in mask_paths]
    row["evidence"] = {  # how each finding shows in each modality (for analysis, not training)
        f: {
            "severity": round(p.severity[f], 4),
            "image_visibility": round(p.image_visibility[f], 4),
            "text": p.text_expressed[f],
            "labs": p.lab_expressed[f],
        }
        for f in SYNTH_FINDINGS
        if p.findings[f]
    }
    row["comorbid"] = [c for c, v in p.comorbid.items() if v]
    row["cardiothoracic_ratio"] = round(drawing.ctr, 4)
    row["_counts"] = {
        "observations": len(labs),
        "notes": len(notes),
        "masks": len(mask_paths),
        "long_notes": sum(len(n.text.split()) > 512 for n in notes),
    }
    return row


CSV_DROP = ("evidence", "comorbid", "_counts")


def _write_labels(out: Path, rows: list[dict[str, Any]]) -> None:
    records = [{k: v for k, v in r.items() if k != "_counts"} for r in rows]
    (out / "labels.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    cols = [k for k in rows[0] if k not in CSV_DROP]
    with (out / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([";".join(r[c]) if isinstance(r[c], list) else r[c] for c in cols])


def generate_cohort(
    out: Path, patients: int, seed: int, sites: Sequence[str] = ("A", "B"), label_noise: float = 0.0
) -> CohortSummary:
    """Write a cohort of ``patients`` under ``out``; same arguments -> byte-identical files."""
    if patients < 1:
        raise ValueError("patients must be at least 1")
    if not 0.0 <= label_noise <= 0.5:
        raise ValueError(f"label_noise {label_noise} must be within [0, 0.5]")
    sites = list(dict.fromkeys(sites))
    if not sites:
        raise ValueError("give at least one site, e.g. sites=('A', 'B')")
    for s in sites:
        site_profile(s)  # fail before writing anything
    out = Path(out)
    started = time.perf_counter()
    _prepare_out(out)
    rows = [_one_patient(out, seed, i, sites[i % len(sites)], label_noise) for i in range(patients)]
    _write_labels(out, rows)
    counts = {"patients": patients, "bundles": patients, "dicom": patients}
    for k in ("observations", "notes", "masks", "long_notes"):
        counts[k] = sum(r["_counts"][k] for r in rows)
    prevalence: dict[str, dict[str, float]] = {}
    for s in sites:
        mine = [r for r in rows if r["site"] == s]
        counts[f"site_{s}"] = len(mine)
        prevalence[s] = {
            f: round(sum(r[f"true_{f}"] for r in mine) / max(len(mine), 1), 4)
            for f in (*SYNTH_FINDINGS, "no_finding")
        }
    summary = CohortSummary(out, seed, patients, sites, label_noise, counts, prevalence)
    meta = {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "args": {"patients": patients, "seed": seed, "sites": sites, "label_noise": label_noise},
        "findings": list(SYNTH_FINDINGS),
        "counts": counts,
        "prevalence": prevalence,
    }
    (out / "cohort.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    summary.seconds = time.perf_counter() - started
    return summary
