"""The fusion model, its training, calibration and evaluation.

Most tests run on planted-signal encodings (random tokens with a known signal, built here), so a
tiny model trains in seconds; the last one trains from a real generated cohort end to end.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from planted import FINDINGS, planted, tiny_config

from mmcds.fusion.calibrate import (
    Method,
    fit_calibration,
    sensitivity_threshold,
)
from mmcds.fusion.data import restrict_training, split_patients
from mmcds.fusion.evaluate import evaluate
from mmcds.fusion.metrics import auroc, ece, ece_if_calibrated
from mmcds.fusion.model import FusionModel, batch_from_encodings, is_current
from mmcds.fusion.pretrain import PretrainSettings, localisation_loss, mask_targets
from mmcds.fusion.report_html import render
from mmcds.fusion.train import TrainSettings, predict_logits
from mmcds.fusion.validation import (
    NEVER,
    Rules,
    SubsetValidation,
    critical_point,
    in_force,
    subset_key,
    warning_point,
)
from mmcds.settings import Settings
from mmcds.training.run import TrainOptions


def test_tiny_model_trains_in_seconds_and_beats_chance(trained: tuple) -> None:
    model, _, test = trained
    z = predict_logits(model, test.encodings)
    for j in range(2):
        assert auroc(test.labels[:, j], z[:, j]) > 0.8


def test_fusion_beats_single_modalities_on_split_evidence(trained: tuple) -> None:
    model, _, test = trained
    both = auroc(test.labels[:, 0], predict_logits(model, test.encodings)[:, 0])
    image = auroc(test.labels[:, 0], predict_logits(model, test.encodings, ["text", "labs"])[:, 0])
    text = auroc(test.labels[:, 0], predict_logits(model, test.encodings, ["image", "labs"])[:, 0])
    assert both > max(image, text) + 0.03
    assert min(image, text) > 0.6  # one modality missing: degraded, not chance


def test_missing_modality_values_do_not_change_the_output() -> None:
    torch.manual_seed(0)
    model = FusionModel(tiny_config()).eval()
    items = planted(8, 5, missing=0.0).encodings
    batch = batch_from_encodings(model.config, items)
    batch.mask["text"][:] = False
    before = model(batch)
    batch.tokens["text"].normal_(mean=5.0, std=10.0)
    after = model(batch)
    assert torch.equal(before, after)
    # and the masked modality is really out: changing a present modality does change the output
    batch.tokens["image"].normal_()  # a LayerNorm ignores a shift
    assert not torch.allclose(before, model(batch))


def test_modality_dropout_hook_removes_a_modality_per_patient() -> None:
    torch.manual_seed(0)
    model = FusionModel(tiny_config()).eval()
    items = planted(4, 6, missing=0.0).encodings
    batch = batch_from_encodings(model.config, items)
    drop = {"labs": torch.tensor([True, False, False, False])}
    dropped = model(batch, drop=drop)
    batch.mask["labs"][0] = False
    assert torch.equal(dropped, model(batch))


def test_save_load_round_trip_is_exact(trained: tuple, tmp_path: Path) -> None:
    model, val, _ = trained
    model.config.calibration = fit_calibration(
        predict_logits(model, val.encodings), val.labels, FINDINGS, val.sites
    ).to_json()
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in tmp_path.iterdir()}
    loaded = FusionModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    for (k, v), (k2, v2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    sites = val.sites[:20]
    assert np.array_equal(
        model.predict_proba(val.encodings[:20], sites),
        loaded.predict_proba(val.encodings[:20], sites),
    )


def test_load_refuses_a_checkpoint_with_missing_weights(trained: tuple, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model, _, _ = trained
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("heads.weight")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match="heads.weight"):
        FusionModel.from_pretrained(tmp_path)


def test_load_refuses_another_architecture_and_names_the_fix(
    trained: tuple, tmp_path: Path
) -> None:
    model, _, _ = trained
    model.save_pretrained(tmp_path)
    assert is_current(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architecture"]  # as a checkpoint saved before modality heads existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert not is_current(tmp_path)
    with pytest.raises(ValueError, match="summary-attention/1.*retrain it with `mmcds train`"):
        FusionModel.from_pretrained(tmp_path)


def test_calibration_lowers_ece_on_planted_miscalibration() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    true_logit = rng.normal(-0.5, 1.5, size=(n, 2))
    y = (rng.random((n, 2)) < 1 / (1 + np.exp(-true_logit))).astype(float)
    sites = ["A" if i % 2 else "B" for i in range(n)]
    # over-confident everywhere, and site B's scores shifted (a prevalence/scanner shift)
    offset = np.array([1.5 if s == "B" else 0.0 for s in sites])[:, None]
    logits = 3.0 * true_logit + offset
    fit, held = slice(0, 2000), slice(2000, n)
    raw = 1 / (1 + np.exp(-logits[held]))
    methods: tuple[Method, ...] = ("temperature", "platt")
    for method in methods:
        cal = fit_calibration(logits[fit], y[fit], FINDINGS, sites[:2000], method)
        p = cal.apply(logits[held], sites[2000:])
        for j in range(2):
            assert ece(y[held, j], p[:, j]) < 0.5 * ece(y[held, j], raw[:, j])
            if method == "platt":  # a scale alone cannot undo site B's offset
                assert ece(y[held, j], p[:, j]) < 0.05
    # temperature near the planted 3
    cal = fit_calibration(logits[fit], y[fit], FINDINGS, None, "temperature")
    assert 2.3 < cal.temperatures["a"] < 3.7
    # the per-site bias absorbs site B's shift; the global calibrator cannot
    cal = fit_calibration(logits[fit], y[fit], FINDINGS, sites[:2000], "platt")
    held_sites = np.array(sites[2000:])
    b = held_sites == "B"
    local, glob = (
        cal.apply(logits[held], sites[2000:]),
        cal.apply(logits[held], sites[2000:], False),
    )
    assert ece(y[held][b, 0], local[b, 0]) < ece(y[held][b, 0], glob[b, 0])


def test_ece_of_a_calibrated_model_is_not_zero_on_a_small_sample_and_we_say_how_large() -> None:
    rng = np.random.default_rng(5)
    p = rng.beta(1.0, 2.0, size=200)
    floor = ece_if_calibrated(p, draws=2000)
    # the vectorised draws agree with ece() itself
    direct = [ece(rng.random(len(p)) < p, p) for _ in range(400)]
    assert floor["mean"] == pytest.approx(np.mean(direct), abs=0.004)
    assert 0.03 < floor["mean"] < floor["p95"] < 0.1  # 200 patients: far from 0
    calibrated = [ece(rng.random(len(p)) < p, p) for _ in range(200)]
    assert np.mean(np.array(calibrated) <= floor["p95"]) > 0.9
    shifted = ece(rng.random(len(p)) < p, np.clip(p + 0.15, 0, 1))  # miscalibrated by 0.15
    assert shifted > floor["p95"]


def test_operating_points_reach_their_targets_on_the_validation_set() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((500, 2)) < 0.3).astype(int)
    p = np.clip(0.3 * y + rng.random((500, 2)) * 0.7, 0, 1)
    rules = Rules()
    for j in range(len(FINDINGS)):
        warning = warning_point(p[:, j], y[:, j], rules)
        critical = max(critical_point(p[:, j], y[:, j], rules), warning)
        pos, neg = p[y[:, j] == 1, j], p[y[:, j] == 0, j]
        # the floors hold, or no target down to the floor keeps them and the point is the
        # first target's own (validation then refuses the finding and says why)
        floors = np.mean(pos >= warning) >= rules.warning_sensitivity_floor and (
            np.mean(neg < warning) >= rules.min_warning_specificity
        )
        own = sensitivity_threshold(p[:, j], y[:, j], rules.warning_sensitivity)
        assert floors or warning == own
        assert np.mean(neg < critical) >= rules.critical_specificity or critical == warning
        assert critical >= warning
    assert sensitivity_threshold(np.array([0.2, 0.9]), np.array([0, 0]), 0.95) > 1.0
    assert critical_point(np.array([0.1, 0.2, 0.3, 0.9]), np.array([0, 0, 0, 1]), rules) > 1.0


def test_split_is_by_patient_deterministic_and_stratified() -> None:
    keys = [f"k{i}" for i in range(200)]
    sites = ["A" if i < 120 else "B" for i in range(200)]
    one = split_patients(keys, sites, seed=3)
    assert one == split_patients(list(reversed(keys)), list(reversed(sites)), seed=3)
    assert one != split_patients(keys, sites, seed=4)
    parts = [set(v) for v in one.values()]
    assert sum(map(len, parts)) == 200 and len(set.union(*parts)) == 200
    test_a = sum(k in one["test"] for k in keys[:120])
    assert test_a == 24 and len(one["test"]) == 40  # 20% of each site
    with pytest.raises(ValueError, match="unique"):
        split_patients(["x", "x"], ["A", "A"], 0)


def test_training_at_one_site_uses_no_other_site_patient_for_training() -> None:
    """``--train-sites A``: fitting, early stopping and calibration see only site A; the other
    site's training and validation patients are set aside; the test split is the one of the full
    cohort, untouched."""
    keys = [f"k{i}" for i in range(200)]
    sites = ["A" if i % 3 else "B" for i in range(200)]
    site_of = dict(zip(keys, sites, strict=True))
    full = split_patients(keys, sites, seed=5)
    at_a = restrict_training(full, keys, sites, ["A"])
    assert at_a["train"] and {site_of[k] for k in at_a["train"] + at_a["val"]} == {"A"}
    assert set(at_a["train"]) == {k for k in full["train"] if site_of[k] == "A"}
    assert set(at_a["val"]) == {k for k in full["val"] if site_of[k] == "A"}
    away = {k for k in full["train"] + full["val"] if site_of[k] == "B"}
    assert set(at_a["unused"]) == away and at_a["test"] == full["test"]
    assert set(at_a["test"]).isdisjoint(at_a["train"] + at_a["val"] + at_a["unused"])
    with pytest.raises(ValueError, match="among the cohort's sites"):
        restrict_training(full, keys, sites, ["C"])
    # the local recalibration rule: full Platt per site where it has >= 50 validation patients
    rng = np.random.default_rng(2)
    z = rng.normal(size=(120, 2))
    y = (rng.random((120, 2)) < 1 / (1 + np.exp(-2 * z))).astype(float)
    val_sites = ["A"] * 70 + ["B"] * 50
    z[70:] += 1.0  # site B's scores shifted
    cal = fit_calibration(z, y, FINDINGS, val_sites, "platt", site_rule="platt")
    assert set(cal.sites) == {"A", "B"}
    assert cal.sites["B"]["a"][1] < cal.global_["a"][1] - 0.3  # B's own bias undoes its shift
    few = fit_calibration(z[:110], y[:110], FINDINGS, val_sites[:110], "platt", site_rule="platt")
    assert set(few.sites) == {"A"}  # 40 patients at B: global calibrator


def test_evaluate_reports_every_subset_site_and_subgroup(trained: tuple) -> None:
    model, val, test = trained
    cal = fit_calibration(predict_logits(model, val.encodings), val.labels, FINDINGS, val.sites)
    model.config.calibration = cal.to_json()
    probs = cal.apply(predict_logits(model, val.encodings), val.sites)
    model.config.warning_threshold = {
        f: warning_point(probs[:, j], val.labels[:, j], Rules()) for j, f in enumerate(FINDINGS)
    }
    model.config.critical_threshold = {
        f: critical_point(probs[:, j], val.labels[:, j], Rules()) for j, f in enumerate(FINDINGS)
    }
    metrics = evaluate(model, test, n_boot=50)
    assert set(metrics["subsets"]) == {
        "image+text+labs",
        "image+text",
        "image+labs",
        "text+labs",
        "image",
        "text",
        "labs",
    }
    m = metrics["subsets"]["image+text+labs"]["a"]
    assert m["auroc_ci"][0] <= m["auroc"] <= m["auroc_ci"][1]
    for key in ("auprc", "ece", "brier"):
        assert m[key] is not None
    assert 0 < m["ece_if_calibrated"]["mean"] <= m["ece_if_calibrated"]["p95"]
    assert set(m["operating_points"]) == {"warning", "critical"}
    assert set(metrics["sites"]) == {"A", "B"}
    assert set(metrics["subgroups"]["sex"]) == {"female", "male"}
    assert metrics["fusion_vs_best_single"]["a"]["best_single"] in ("image", "text")
    assert metrics["site_shift"]["a"]["global"].keys() == {"A", "B"}
    lo, hi = metrics["site_shift"]["a"]["gap_change_ci"]  # paired bootstrap of the gap change
    assert lo <= metrics["site_shift"]["a"]["gap_change"] <= hi
    summary = metrics["site_shift_summary"]
    lo, hi = summary["mean_gap_change_ci"]
    assert lo <= summary["mean_gap_change"] <= hi
    json.dumps(metrics)  # serialisable as metrics.json
    page = render(metrics)
    assert page.count("<svg") >= 4 * 2 + 2 and "Reliability: a" in page


def test_localisation_loss_is_low_only_when_the_activation_peak_is_on_the_lesion() -> None:
    """The CNN's localisation term: a class activation map peaked inside the mask costs little,
    one peaked outside costs much, findings without a mask cost nothing, and the gradient moves
    the map's mass towards the lesion."""
    masks = mask_targets(
        [{"a": np.pad(np.ones((8, 8), bool), ((0, 24), (0, 24)))}], FINDINGS, (32, 32)
    )
    assert masks.shape == (1, 2, 32, 32) and masks[0, 1].max() == 0  # "b" has no mask
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # finding k reads channel k

    def loss_for(peak: tuple[int, int]) -> torch.Tensor:
        fmap = torch.zeros(1, 2, 4, 4)
        fmap[0, :, peak[0], peak[1]] = 6.0
        return localisation_loss(fmap, weight, masks)

    on, off = float(loss_for((0, 0))), float(loss_for((3, 3)))
    assert on < 0.05 < 3.0 < off  # -log(softmax share inside): ~0.04 against ~6
    fmap = torch.zeros(1, 2, 4, 4, requires_grad=True)
    localisation_loss(fmap, weight, masks).backward()
    assert fmap.grad is not None
    assert fmap.grad[0, 0, 0, 0] < 0 < fmap.grad[0, 0, 3, 3]  # descent raises the lesion cell
    assert fmap.grad[0, 1].abs().max() == 0  # "b": no mask, no pull
    none = mask_targets([{}], FINDINGS, (32, 32))
    assert float(localisation_loss(torch.randn(1, 2, 4, 4), weight, none)) == 0.0


def _scratch_settings(tmp_path: Path) -> Settings:
    return Settings(model_dir=tmp_path / "models", database_url=f"sqlite:///{tmp_path}/c.db")


def _quick_options(fusion_epochs: int) -> TrainOptions:
    """One image-encoder epoch and a few fusion epochs: the CLI path in seconds."""
    return TrainOptions(
        seed=1,
        pretrain_settings=PretrainSettings(epochs=1),
        progress=False,
        train_settings=TrainSettings(epochs=fusion_epochs),
    )


@pytest.mark.slow
def test_train_and_evaluate_from_a_generated_cohort(tmp_path: Path) -> None:
    """The CLI path end to end on a small real cohort: FHIR + DICOM in, model folder out, and
    the pipeline then loads the fine-tuned encoders from it."""
    from mmcds.fusion.pipeline import Pipeline
    from mmcds.synth import generate_cohort
    from mmcds.training.run import evaluate_cohort, train_cohort

    cohort = tmp_path / "cohort"
    generate_cohort(cohort, patients=16, seed=11)
    settings = _scratch_settings(tmp_path)
    out = tmp_path / "model"
    info = train_cohort(cohort, out, settings, _quick_options(3), echo=lambda s: None)
    assert {"config.json", "model.safetensors", "README.md", "lab_encoder.json"} <= {
        p.name for p in out.iterdir()
    }
    config = FusionModel.from_pretrained(out).config
    assert config.trained and config.calibration and config.warning_threshold
    assert set(info["split"]["test"]).isdisjoint(info["split"]["train"] + info["split"]["val"])
    cnn_log, vit_log = info["pretrain"]["cnn"], info["pretrain"]["vit"]
    assert cnn_log["masked_images"] > 0 and "train_localisation" in cnn_log["history"][0]
    assert vit_log["masked_images"] == 0  # no class activation map to localise with
    card = (out / "README.md").read_text()
    assert "fine-tuned" in card and f"the {cnn_log['masked_images']} training images" in card
    # the model-wide points are the ones the service applies with every input (a 16-patient
    # cohort validates nothing, so none may alarm: no card or table may say otherwise)
    full = SubsetValidation.from_json(config.subsets[subset_key(config.modalities)])
    assert (config.warning_threshold, config.critical_threshold) == in_force(full, config.findings)
    for f in config.findings:
        if not full.findings[f].validated:
            assert config.warning_threshold[f] == config.critical_threshold[f] == NEVER
            rows = [line for line in card.splitlines() if line.startswith(f"| {f} |")]
            assert any(row.endswith("| never | never |") for row in rows)  # metrics table
    pipe = Pipeline.from_settings(settings.model_copy(update={"fusion_model": str(out)}))
    assert pipe.cnn.model_id.startswith("cnn@") and pipe.vit.model_id.startswith("vit@")
    assert config.encoder_ids["image"] == f"{pipe.cnn.model_id}+{pipe.vit.model_id}"
    metrics = evaluate_cohort(
        out, cohort, tmp_path / "report", settings, n_boot=20, progress=False, echo=lambda s: None
    )
    assert metrics["data"]["patients"] == len(info["split"]["test"])
    assert (tmp_path / "report" / "report.html").stat().st_size > 1000


@pytest.mark.slow
def test_local_calibration_fits_on_unseen_patients_and_holds_out_the_rest(
    tmp_path: Path,
) -> None:
    """``mmcds calibrate``: never on the training cohort's patients; the held-out part is
    recorded and is all ``mmcds evaluate`` scores on that folder afterwards."""
    from mmcds.synth import generate_cohort
    from mmcds.training.recalibrate import recalibrate_cohort
    from mmcds.training.run import evaluate_cohort, train_cohort

    home, local = tmp_path / "home", tmp_path / "local"
    generate_cohort(home, patients=16, seed=11)
    generate_cohort(local, patients=12, seed=12)
    settings = _scratch_settings(tmp_path)
    model = tmp_path / "model"
    train_cohort(home, model, settings, _quick_options(2), echo=lambda s: None)
    quiet = partial(recalibrate_cohort, settings=settings, progress=False, echo=lambda s: None)
    with pytest.raises(ValueError, match="has not seen"):
        quiet(model, home, tmp_path / "no")
    with pytest.raises(ValueError, match="new folder"):
        quiet(model, local, model)
    out = tmp_path / "model-local"
    info = quiet(model, local, out, fraction=0.5)
    keys = set(pd.read_csv(local / "labels.csv", dtype={"patient_key": str})["patient_key"])
    assert set(info["calibration"]) | set(info["test"]) == keys
    assert set(info["calibration"]).isdisjoint(info["test"]) and info["test"]
    before, after = (FusionModel.from_pretrained(p).config for p in (model, out))
    assert after.version.startswith(before.version + "+local-")
    assert after.training["local_calibration"]["test"] == info["test"]
    assert "## Local calibration" in (out / "README.md").read_text()
    assert (out / "cnn").is_dir() and (out / "vit").is_dir()  # the encoders travel with it
    metrics = evaluate_cohort(
        out, local, tmp_path / "r", settings, n_boot=0, progress=False, echo=lambda s: None
    )
    assert metrics["data"]["patients"] == len(info["test"])
    assert metrics["data"]["split"] == "held out by local calibration"
