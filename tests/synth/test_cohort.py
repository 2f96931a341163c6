"""The synthetic cohort: valid FHIR and DICOM, the agreed layout, determinism, and the split of
evidence across modalities measured with honest reference models."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from PIL import Image

from mmcds.encoders.catalogue import BY_LOINC, to_canonical
from mmcds.findings import SYNTH_FINDINGS
from mmcds.synth import generate_cohort
from mmcds.synth.latent import IMAGE_EXPRESSION, sample_patient
from mmcds.synth.reference import evaluate, load_cohort, markdown, site_shift
from mmcds.synth.sites import site_profile

ALLOWED = {"Patient", "Encounter", "Observation", "DocumentReference", "ImagingStudy"}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    s = generate_cohort(out, patients=36, seed=11, sites=("A", "B", "C"))
    assert s.counts["patients"] == 36
    return out


def _labels(out: Path) -> list[dict[str, Any]]:
    return list(json.loads((out / "labels.json").read_text()))


def _bundle(out: Path, key: str) -> dict[str, Any]:
    return dict(json.loads((out / "bundles" / f"{key}.json").read_text()))


def _resources(b: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == kind]


def _digest_tree(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def test_layout_and_labels(small: Path) -> None:
    rows = _labels(small)
    with (small / "labels.csv").open() as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["patient_key"] for r in csv_rows] == [r["patient_key"] for r in rows]
    need = {
        "patient_key",
        "site",
        "sex",
        "age",
        "age_band",
        "study_uid",
        "sop_uids",
        "mask_paths",
        *SYNTH_FINDINGS,
        *(f"true_{f}" for f in SYNTH_FINDINGS),
    }
    assert need <= set(csv_rows[0])
    assert {r["site"] for r in rows} == {"A", "B", "C"}
    assert all(re.fullmatch(r"synth-11-\d{5}", r["patient_key"]) for r in rows)
    for r in rows:
        key = r["patient_key"]
        assert (small / "bundles" / f"{key}.json").is_file()
        assert [p.name for p in (small / "dicom" / key).iterdir()] == [f"{r['sop_uids'][0]}.dcm"]
        for f in SYNTH_FINDINGS:  # a mask exactly for the findings the radiograph shows
            shows = bool(r[f"true_{f}"]) and r["evidence"][f]["image_visibility"] > 0
            assert bool(r[f"mask_{f}"]) == shows, (key, f)
            if r[f"mask_{f}"]:
                assert r[f"mask_{f}"] == f"masks/{key}/{r['sop_uids'][0]}_{f}.png"
    meta = json.loads((small / "cohort.json").read_text())
    assert meta["seed"] == 11 and meta["args"]["patients"] == 36
    assert set(meta["prevalence"]) == {"A", "B", "C"}
    assert sum(r["true_no_finding"] for r in rows) > 0
    assert any(sum(r[f"true_{f}"] for f in SYNTH_FINDINGS) > 1 for r in rows)  # co-occurrence


def test_heart_failure_is_missing_from_some_radiographs_and_lesions_never_are() -> None:
    rng = np.random.default_rng(3)
    people = [sample_patient(rng, i, f"k{i}", site_profile("B"), 3) for i in range(4000)]
    for f in SYNTH_FINDINGS:
        present = [p for p in people if p.findings[f]]
        hidden = np.mean([p.image_visibility[f] == 0 for p in present])
        # binomial sd of the share is <= 0.02 with a few hundred patients
        assert abs(hidden - (1 - IMAGE_EXPRESSION[f])) < 0.06, (f, hidden, len(present))
    assert IMAGE_EXPRESSION["heart_failure"] < 1.0
    assert all(IMAGE_EXPRESSION[f] == 1.0 for f in SYNTH_FINDINGS if f != "heart_failure")


def test_bundles_validate_as_r4b_and_hold_no_labels(small: Path) -> None:
    for r in _labels(small):
        raw = (small / "bundles" / f"{r['patient_key']}.json").read_text()
        Bundle.model_validate_json(raw)  # raises on any invalid element
        b = json.loads(raw)
        assert b["type"] == "transaction"
        kinds = {e["resource"]["resourceType"] for e in b["entry"]}
        assert kinds <= ALLOWED, "the truth must never travel inside the FHIR data"
        urls = {e["fullUrl"] for e in b["entry"]}
        assert all(u.startswith("urn:uuid:") for u in urls) and len(urls) == len(b["entry"])
        for ref in re.findall(r'"reference":"([^"]+)"', raw):
            assert ref in urls, f"dangling reference {ref}"
        pat = b["entry"][0]
        assert pat["request"] == {
            "method": "POST",
            "url": "Patient",
            "ifNoneExist": f"identifier=urn:mmcds:synth:patient|{r['patient_key']}",
        }
        assert pat["resource"]["identifier"][0]["value"] == r["patient_key"]
        assert all(e["request"]["method"] == "POST" for e in b["entry"])


def test_observations_follow_the_catalogue(small: Path) -> None:
    units: dict[tuple[str, str], set[str]] = {}
    per_patient_counts: list[Counter[str]] = []
    for r in _labels(small):
        b = _bundle(small, r["patient_key"])
        c: Counter[str] = Counter()
        for o in _resources(b, "Observation"):
            spec = BY_LOINC[o["code"]["coding"][0]["code"]]
            assert o["code"]["coding"][0]["system"] == "http://loinc.org"
            assert o["status"] == "final" and o["effectiveDateTime"].endswith("Z")
            cat = o["category"][0]["coding"][0]
            assert cat["code"] == spec.category
            assert cat["system"] == "http://terminology.hl7.org/CodeSystem/observation-category"
            q = o["valueQuantity"]
            assert q["system"] == "http://unitsofmeasure.org" and q["code"] == q["unit"]
            value = to_canonical(spec, q["value"], q["code"])  # raises on an unknown unit
            rr = o["referenceRange"][0]
            assert {v["code"] for v in rr.values()} == {q["code"]}
            hi = to_canonical(spec, rr["high"]["value"], q["code"])
            code = o["interpretation"][0]["coding"][0]["code"]
            assert code in {"H", "L", "N"}
            assert (code == "H") == (q["value"] > rr["high"]["value"])
            assert spec.ref_high is not None and abs(hi - spec.ref_high) < 0.02 * spec.ref_high
            assert np.isfinite(value)
            units.setdefault((spec.name, r["site"]), set()).add(q["code"])
            c[spec.name] += 1
        per_patient_counts.append(c)
    assert units[("wbc", "A")] == {"10*3/uL"} and units[("wbc", "B")] == {"10*9/L"}
    assert units[("crp", "A")] == {"mg/L"} and units[("crp", "B")] == {"mg/dL"}
    assert units[("temperature", "C")] == {"[degF]"}
    assert any(c["wbc"] > 1 for c in per_patient_counts), "no repeated measurements"
    assert any(c["procalcitonin"] == 0 for c in per_patient_counts), "no missing labs"


def test_dicom_decodes_with_tags_and_uids_of_its_study(small: Path) -> None:
    shapes, photometric = set(), set()
    for r in _labels(small):
        key, sop = r["patient_key"], r["sop_uids"][0]
        ds = pydicom.dcmread(small / "dicom" / key / f"{sop}.dcm")
        px = ds.pixel_array
        assert px.dtype == np.uint16 and px.shape == (ds.Rows, ds.Columns)
        assert ds.Modality in {"CR", "DX"} and ds.ViewPosition in {"PA", "AP"}
        assert 12 <= ds.BitsStored <= 16 and px.max() < 2**ds.BitsStored
        assert ds.PhotometricInterpretation in {"MONOCHROME1", "MONOCHROME2"}
        assert float(ds.WindowWidth) > 0 and ds.RescaleSlope is not None
        assert ds.PatientID == key and ds.InstitutionName == f"Site {r['site']}"
        study = _resources(_bundle(small, key), "ImagingStudy")[0]
        assert study["identifier"][0] == {
            "system": "urn:dicom:uid",
            "value": f"urn:oid:{ds.StudyInstanceUID}",
        }
        assert ds.StudyInstanceUID == r["study_uid"]
        series = study["series"][0]
        assert series["uid"] == ds.SeriesInstanceUID and series["modality"]["code"] == ds.Modality
        inst = series["instance"][0]
        assert inst["uid"] == ds.SOPInstanceUID == sop
        assert inst["sopClass"]["code"] == f"urn:oid:{ds.SOPClassUID}"
        assert ds.file_meta.MediaStorageSOPInstanceUID == sop
        assert all(len(u) <= 64 for u in (sop, ds.StudyInstanceUID, ds.SeriesInstanceUID))
        shapes.add((r["site"], px.shape))
        photometric.add((r["site"], ds.PhotometricInterpretation))
        for f in SYNTH_FINDINGS:
            if r[f"mask_{f}"]:
                m = np.asarray(Image.open(small / r[f"mask_{f}"]))
                assert m.dtype == np.uint8 and m.shape == px.shape
                assert set(np.unique(m)) <= {0, 255} and (m == 255).sum() > 10
    assert len({s for _, s in shapes}) == 3, "sites should differ in resolution"
    assert ("B", "MONOCHROME1") in photometric and ("A", "MONOCHROME2") in photometric


def test_notes_have_types_sections_negation_and_length(small: Path) -> None:
    types: Counter[str] = Counter()
    texts: list[str] = []
    for r in _labels(small):
        for d in _resources(_bundle(small, r["patient_key"]), "DocumentReference"):
            att = d["content"][0]["attachment"]
            assert d["status"] == "current" and att["contentType"] == "text/plain; charset=utf-8"
            types[d["type"]["coding"][0]["code"]] += 1
            texts.append(base64.b64decode(att["data"]).decode("utf-8"))
    assert set(types) == {"34111-5", "11506-3", "18748-4"}
    blob = "\n".join(texts)
    for marker in (
        "HISTORY OF PRESENT ILLNESS",
        "ASSESSMENT AND PLAN",
        "IMPRESSION:",
        "(copied",
        "no evidence of",
        "PHYSICAL EXAM",
    ):
        assert marker.lower() in blob.lower(), marker
    assert re.search(r"\b(denies|Denies|negative for)\b", blob)
    assert sum(len(t.split()) > 512 for t in texts) >= 1, "no note beyond 512 tokens"


def test_same_seed_same_bytes_other_seed_other_patients(tmp_path: Path) -> None:
    a = _digest_tree(generate_cohort(tmp_path / "a", 6, seed=3).out)
    b = _digest_tree(generate_cohort(tmp_path / "b", 6, seed=3).out)
    assert a == b
    prefix = _digest_tree(generate_cohort(tmp_path / "p", 4, seed=3).out)
    for k in prefix:  # patient i does not depend on the cohort size
        if k.startswith(("bundles/", "dicom/", "masks/")):
            assert prefix[k] == a[k]
    c = generate_cohort(tmp_path / "c", 6, seed=4).out
    assert not set(_digest_tree(c).values()) & set(a.values())
    assert _labels(c) != _labels(tmp_path / "a")
    # regenerating into a cohort directory replaces it wholly
    generate_cohort(tmp_path / "a", 2, seed=3)
    assert len(list((tmp_path / "a" / "bundles").iterdir())) == 2


def test_label_noise_flips_labels_but_not_the_patients(tmp_path: Path) -> None:
    clean = generate_cohort(tmp_path / "clean", 30, seed=5)
    noisy = generate_cohort(tmp_path / "noisy", 30, seed=5, label_noise=0.3)
    assert _digest_tree(clean.out / "bundles") == _digest_tree(noisy.out / "bundles")
    rows = _labels(noisy.out)
    flips = sum(r[f] != r[f"true_{f}"] for r in rows for f in SYNTH_FINDINGS)
    assert flips > 0
    assert [[r[f"true_{f}"] for f in SYNTH_FINDINGS] for r in rows] == [
        [r[f] for f in SYNTH_FINDINGS] for r in _labels(clean.out)
    ]


def test_refuses_to_write_over_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        generate_cohort(tmp_path, 2, seed=1)
    with pytest.raises(ValueError, match="site name"):
        generate_cohort(tmp_path / "x", 2, seed=1, sites=("A", "b/../c"))


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "medium"
    generate_cohort(out, patients=400, seed=2024, sites=("A", "B"))
    return out


@pytest.mark.slow
def test_no_single_phrase_gives_the_label_away(medium: Path) -> None:
    data = load_cohort(medium, image_size=8)
    grams = [set(re.findall(r"[a-z/]+(?: [a-z/]+)?", t.lower())) for t in data.texts]
    for f in SYNTH_FINDINGS:
        y = data.truth[f].astype(bool)
        pos: Counter[str] = Counter(g for i in np.flatnonzero(y) for g in grams[i])
        neg: Counter[str] = Counter(g for i in np.flatnonzero(~y) for g in grams[i])
        for g, n in pos.items():
            recall, fp = n / y.sum(), neg[g] / max((~y).sum(), 1)
            assert not (recall > 0.6 and fp < 0.05), f"{g!r} reads off {f}"


@pytest.mark.slow
def test_evidence_is_split_and_site_shift_is_real(medium: Path) -> None:
    data = load_cohort(medium)
    res = evaluate(data, seed=0)
    res.site_shift = site_shift(data, "A", "B", seed=0)
    print("\n" + markdown(res, "pytest tests/test_synth.py (400 patients, seed 2024)"))
    for f in ("pneumonia", "heart_failure"):  # the findings meant to need fusion
        _, best = res.best_single(f)
        assert res.auroc[f]["all"] > best + 0.02, (f, res.auroc[f])
        assert max(res.auroc[f][m] for m in ("labs", "text", "image")) < 0.95
    for f in SYNTH_FINDINGS:
        assert res.auroc[f]["all"] > 0.75, (f, res.auroc[f])
    losses = [r["A->A"] - r["A->B"] for r in res.site_shift.values()]
    assert float(np.nanmean(losses)) > 0.03, res.site_shift
