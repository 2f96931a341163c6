"""Data unlike the training cohort (DESIGN §8): real Synthea patients and real radiographs from
``../shared/data`` scored by a model trained on the synthetic cohort never alarm, and say why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmcds.encoders.dicom import decode_dicom
from mmcds.encoders.quality import check_quality
from mmcds.explain.summary import summary_line, summary_markdown
from mmcds.fhir.bundle_source import BundleFhir, LocalDicom
from mmcds.fhir.gather import gather_patient
from mmcds.fusion.pipeline import Pipeline
from mmcds.fusion.pretrain import PretrainSettings
from mmcds.fusion.train import TrainSettings
from mmcds.records import Explanation, Level, Patient, PatientRecord
from mmcds.settings import Settings
from mmcds.synth import generate_cohort
from mmcds.training.run import TrainOptions, train_cohort


@pytest.fixture(scope="module")
def synthetic_model(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    root = tmp_path_factory.mktemp("shift")
    generate_cohort(root / "cohort", patients=60, seed=11)
    settings = Settings(model_dir=root / "models", database_url=f"sqlite:///{root}/c.db")
    options = TrainOptions(
        seed=1,
        pretrain_settings=PretrainSettings(epochs=1),
        train_settings=TrainSettings(epochs=5),
        progress=False,
    )
    train_cohort(root / "cohort", root / "model", settings, options, echo=lambda s: None)
    return Pipeline.from_settings(settings.model_copy(update={"fusion_model": str(root / "model")}))


@pytest.mark.slow
def test_synthea_patients_get_no_alarm_and_the_reason(
    synthetic_model: Pipeline, shared_data: Path
) -> None:
    bundles = sorted((shared_data / "synthea-r4").glob("*.json"))
    assert bundles
    flagged = 0
    for path in bundles:
        # labs and vitals only; the imaging studies they list are not in any PACS
        record = gather_patient(BundleFhir(json.loads(path.read_text())), LocalDicom({}), "p")
        analysis = synthetic_model.analyse(record)
        a = analysis.assessment
        assert a.level == Level.info, path.name
        # what the card says (its summary and detail are these two renderings)
        line = summary_line(analysis)
        detail = summary_markdown(analysis, Explanation(analysis_id="a"))
        assert line.startswith("AI (preliminary): not assessed,"), (path.name, line)
        assert "No finding above its alert threshold." in detail
        for score in a.findings:
            assert score.status in ("abstained", "insufficient_inputs"), (path.name, score)
            assert score.reason and score.reason in detail, (path.name, score.reason)
        flagged += bool(a.out_of_distribution)
    # Not only "insufficient inputs": the detector itself sees that these labs are not the
    # training cohort's.
    assert flagged >= len(bundles) // 2, flagged


@pytest.mark.slow
def test_real_radiographs_are_outside_the_validated_distribution(
    synthetic_model: Pipeline, shared_data: Path
) -> None:
    checked = 0
    for path in sorted((shared_data / "dicom").glob("*.dcm")):
        image = decode_dicom(path.read_bytes(), reference=path.name)
        if any(q.severity == "reject" for q in check_quality(image)):
            continue  # e.g. the CT slice: gather never passes it to the models
        record = PatientRecord(patient=Patient(id="p"), images=[image])
        analysis = synthetic_model.analyse(record)
        assert "image" in analysis.assessment.out_of_distribution, path.name
        assert all(s.status == "abstained" for s in analysis.assessment.findings)
        checked += 1
    assert checked >= 3
