"""Training on what a hospital has (issue 22): any subset of modalities, its own findings.

Small cohorts trained for a few epochs: these check that every path runs end to end and that
findings and modalities travel with the model, not that the models are good."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mmcds.explain.stage import explain
from mmcds.explain.summary import summary_line, summary_markdown
from mmcds.fhir.report import report_bundle
from mmcds.findings import UnknownFinding, finding
from mmcds.fusion.lexical import fit_lexical, note_text
from mmcds.fusion.model import FusionModel
from mmcds.fusion.pipeline import Pipeline
from mmcds.fusion.pretrain import PretrainSettings
from mmcds.fusion.train import TrainSettings
from mmcds.records import Explanation
from mmcds.settings import Settings
from mmcds.synth import generate_cohort
from mmcds.synth.subset import keep_modalities
from mmcds.training.dataset import iter_examples
from mmcds.training.run import TrainOptions, evaluate_cohort, train_cohort

PATIENTS = 40


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("modalities")
    generate_cohort(root / "full", patients=PATIENTS, seed=5)
    return root / "full"


def _settings(root: Path) -> Settings:
    return Settings(model_dir=root / "models", database_url=f"sqlite:///{root}/cache.db")


def _options(**kw: object) -> TrainOptions:
    return TrainOptions(
        seed=2,
        pretrain_settings=PretrainSettings(epochs=1),
        train_settings=TrainSettings(epochs=3),
        progress=False,
        **kw,  # type: ignore[arg-type]
    )


def _subset(full: Path, keep: tuple[str, ...]) -> Path:
    out = full.parent / "+".join(keep)
    shutil.copytree(full, out)
    keep_modalities(out, keep)
    return out


def _train(data: Path, **kw: object) -> tuple[Path, list[str]]:
    lines: list[str] = []
    model = data.parent / f"model-{data.name}"
    train_cohort(data, model, _settings(data.parent), _options(**kw), echo=lines.append)
    return model, lines


@pytest.mark.parametrize("keep", [("text",), ("image",), ("labs",)])
def test_one_modality_trains_evaluates_and_records_it(full: Path, keep: tuple[str, ...]) -> None:
    data = _subset(full, keep)
    model_dir, lines = _train(data)
    skipped = any("image fine-tuning, mask localisation and int8" in s for s in lines)
    assert skipped == ("image" not in keep)
    config = FusionModel.from_pretrained(model_dir).config
    assert config.modalities == list(keep)
    assert config.training["modalities"] == list(keep)
    assert set(config.subsets) == {keep[0]}  # validated on what it had, nothing else
    baseline = "tfidf" if keep == ("text",) else None
    report = data.parent / f"eval-{data.name}"
    metrics = evaluate_cohort(
        model_dir, data, report, _settings(data.parent),
        n_boot=20, baseline=baseline, progress=False, echo=lambda s: None,
    )  # fmt: skip
    assert set(metrics["findings"]) == set(config.findings)
    if baseline:  # TF-IDF + LR fitted on the model's training split, scored on its test split
        rows = metrics["baseline"]["findings"]
        assert list(rows) == config.findings
        assert metrics["baseline"]["fitted_on"].endswith(
            f"({len(config.training['split']['train'])} patients)"
        )
        for f, row in rows.items():
            assert row["n"] == len(config.training["split"]["test"])
            assert row["model_auroc"] == metrics["subsets"]["image+text+labs"][f]["auroc"]
            assert "model_minus_baseline_ci" in row
        assert "tfidf AUROC" in (report / "report.html").read_text()


def test_notes_only_model_serves_and_says_imaging_is_not_used(full: Path) -> None:
    data = _subset(full, ("text",)) if not (full.parent / "text").exists() else full.parent / "text"
    model_dir = data.parent / "model-text"
    if not model_dir.exists():
        _train(data)
    settings = _settings(data.parent).model_copy(update={"fusion_model": str(model_dir)})
    pipe = Pipeline.from_settings(settings)
    # a patient who brings everything: the model uses the notes and says so for the rest
    record = next(iter_examples(full, 1)).record
    analysis = pipe.analyse(record)
    assert analysis.assessment.modalities_used == ["text"]
    assert analysis.assessment.unused_modalities == ["image", "labs"]
    text = summary_markdown(analysis, Explanation(analysis.identifier)) + summary_line(analysis)
    assert "imaging not used by this model" in text
    assert "no imaging available" not in text


def test_notes_only_lexical_path_comes_from_the_training_split_and_is_served(full: Path) -> None:
    """The model's TF-IDF + LR is the one fitted on its training split's notes (refitting it on
    those patients alone gives the same vocabulary and weights); at analysis the pipeline
    computes its logits from the patient's notes, and the explanation accounts for it."""
    data = _subset(full, ("text",)) if not (full.parent / "text").exists() else full.parent / "text"
    model_dir = data.parent / "model-text"
    if not model_dir.exists():
        _train(data)
    model = FusionModel.from_pretrained(model_dir)
    assert model.lexical is not None and model.config.lexical["patients"] > 0
    assert "lexical path" in (model_dir / "README.md").read_text()  # the model card says so
    names, split = model.config.findings, model.config.training["split"]
    examples = {ex.key: ex for ex in iter_examples(data, None, names)}
    train = [examples[k] for k in split["train"]]
    labels = np.array([[ex.labels.get(f, -1) for f in names] for ex in train], float)
    texts = [note_text(ex.record.notes) for ex in train]
    refit, _ = fit_lexical(texts, labels, names, seed=model.config.training["seed"])
    assert refit.terms == model.lexical.terms
    assert np.array_equal(refit.coef, model.lexical.coef)
    pipe = Pipeline.from_settings(
        _settings(data.parent).model_copy(update={"fusion_model": str(model_dir)})
    )
    record = examples[split["test"][0]].record
    analysis = pipe.analyse(record)
    served = analysis.encodings.by_modality["text"].lexical
    assert served is not None
    assert np.array_equal(served, model.lexical.logits([note_text(record.notes)])[0])
    explanation = explain(pipe, analysis, overlays=False)
    assert explanation.evidence  # sentences quoted, the lexical path's included
    for m in explanation.modalities:  # notes only: the text's Shapley value is the whole change
        assert m.values["text"] == pytest.approx(m.full - m.base, abs=1e-6)


def _relabel(full: Path, rename: dict[str, str]) -> Path:
    """The cohort labelled with other catalogue findings, as a site's labels file would be."""
    out = full.parent / ("labelled-" + "-".join(rename.values()))
    shutil.copytree(full, out)
    keep_modalities(out, ("text", "labs"))  # no masks for the renamed findings
    meta = json.loads((out / "cohort.json").read_text())
    meta.pop("findings")
    (out / "cohort.json").write_text(json.dumps(meta))
    with (out / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    keep = ["patient_key", "site", "sex", "age_band"]
    with (out / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, [*keep, *rename.values()])
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r[k] for k in keep}, **{v: r[k] for k, v in rename.items()}})
    return out


def test_catalogue_findings_train_and_reach_cards_and_reports(full: Path) -> None:
    rename = {
        "heart_failure": "cardiomegaly",
        "pneumonia": "atelectasis",
        "pleural_effusion": "pleural_effusion",
    }
    data = _relabel(full, rename)
    model_dir, _ = _train(data)
    config = FusionModel.from_pretrained(model_dir).config
    assert config.findings == ["cardiomegaly", "atelectasis", "pleural_effusion"]
    assert config.finding_entries["cardiomegaly"]["snomed"] == "8186001"
    pipe = Pipeline.from_settings(
        _settings(data.parent).model_copy(update={"fusion_model": str(model_dir)})
    )
    analysis = pipe.analyse(next(iter_examples(data, 1, config.findings)).record)
    assert [f.finding for f in analysis.assessment.findings] == config.findings
    bundle = report_bundle(analysis, Explanation(analysis.identifier))
    codes = {
        c["code"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
        for c in e["resource"]["code"]["coding"]
    }
    assert codes == {"8186001", "46621007", "60046008"}
    card = summary_markdown(analysis, Explanation(analysis.identifier))
    for name in config.findings:
        assert finding(name).display in card
    assert "Pneumonia" not in card and "Heart failure" not in card


def test_unknown_label_column_names_the_catalogue(full: Path, tmp_path: Path) -> None:
    data = _relabel(full, {"pneumonia": "pneumonia", "heart_failure": "chest_pain"})
    with pytest.raises(UnknownFinding, match=r"chest_pain.*mmcds/data/findings.json"):
        _train(data)
    site = tmp_path / "site.json"
    site.write_text(
        json.dumps({"findings": {"chest_pain": {"display": "Chest pain", "snomed": "29857009"}}})
    )
    model_dir, _ = _train(data, finding_catalogue=str(site))
    config = FusionModel.from_pretrained(model_dir).config
    assert config.findings == ["pneumonia", "chest_pain"]
    assert config.finding_entries["chest_pain"]["display"] == "Chest pain"


def test_uncertain_labels_keep_their_patients_and_few_positives_warn(full: Path) -> None:
    """--uncertain ignore: the unknown label is masked, the patient stays (in training and in the
    figures of the other findings); findings with < 30 training positives warn on the card."""
    data = full.parent / "uncertain"
    shutil.copytree(full, data)
    keep_modalities(data, ("text", "labs"))
    with (data / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    unknown = {r["patient_key"] for r in rows[::3]}
    for r in rows:
        if r["patient_key"] in unknown:
            r["pneumonia"] = "-1"
    with (data / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    model_dir, lines = _train(data)
    config = FusionModel.from_pretrained(model_dir).config
    split = config.training["split"]
    assert sorted(k for v in split.values() for k in v) == sorted(r["patient_key"] for r in rows)
    label = {r["patient_key"]: int(r["pneumonia"]) for r in rows}
    assert config.training["positives"]["train"]["pneumonia"] == sum(
        label[k] == 1 for k in split["train"]
    )
    # 40 patients: every finding has fewer than 30 positives in training
    assert set(config.training["few_positives"]) == set(config.findings)
    assert any(line.startswith("warning: pneumonia: only") for line in lines)
    card = (model_dir / "README.md").read_text()
    assert "**Warning, pneumonia**: only" in card
    record = json.loads((model_dir / "val_metrics.json").read_text())
    assert set(record["warnings"]["few_positives"]) == set(config.findings)
    metrics = evaluate_cohort(
        model_dir, data, data.parent / "eval-uncertain", _settings(data.parent),
        n_boot=50, progress=False, echo=lambda s: None,
    )  # fmt: skip
    assert set(metrics["warnings"]["few_positives"]) == set(config.findings)
    scored = metrics["subsets"]["image+text+labs"]
    test = split["test"]
    assert scored["pneumonia"]["n"] == sum(label[k] >= 0 for k in test) < len(test)
    assert scored["heart_failure"]["n"] == len(test)  # the patient's other labels still count
    assert scored["pneumonia"]["auroc_ci"] is not None  # a CI, not a point estimate alone
