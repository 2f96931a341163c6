"""The lexical path of the fusion model (``mmcds.fusion.lexical``): TF-IDF + logistic regression
over the notes, fitted on the training split, an input of the text head masked with the notes.

Planted notes-only cohorts whose signal is in the words; the text tokens are noise (seconds, no
text encoder)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from planted import FINDINGS, tiny_config

from mmcds.explain.attribution import temperatures
from mmcds.explain.lexical import lexical_term, sentence_effects
from mmcds.fusion.data import EncodedSet
from mmcds.fusion.lexical import LexicalPath, fit_lexical, use_out_of_fold
from mmcds.fusion.metrics import auroc
from mmcds.fusion.model import FusionModel, batch_from_encodings
from mmcds.fusion.train import TrainSettings, predict_logits, train_fusion, without
from mmcds.records import Encodings, ModalityEncoding, Note
from mmcds.training.baseline import fit_predict

FILLER = ["cough", "stable", "walking", "eating", "sleeping", "reviewed", "plan", "family", "seen"]


def _cohort(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Notes whose words carry finding ``a`` (weakly: some positives never say it, some negatives
    do) and ``b`` (a different phrase); labels (n, 2)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 2)) < 0.4).astype(float)
    texts = []
    for ya, yb in y:
        words = list(rng.choice(FILLER, 20))
        if rng.random() < (0.6 if ya else 0.15):
            words += ["right", "lower", "lobe", "consolidation"]
        if rng.random() < (0.55 if yb else 0.15):
            words += ["raised", "bnp"]
        texts.append(" ".join(rng.permutation(words)))
    return texts, y


def _encoded(texts: list[str], y: np.ndarray, seed: int, keys: str) -> EncodedSet:
    """Noise text tokens (the encoder's share carries nothing here), no other modality."""
    rng = np.random.default_rng(seed)
    encs = []
    for _i in range(len(texts)):
        tokens = rng.normal(size=(3, tiny_config().input_dims["text"])).astype(np.float32)
        text = ModalityEncoding("text", tokens, ["t0", "t1", "t2"], "text", [])
        encs.append(Encodings({"text": text}))
    return EncodedSet([f"{keys}{i:03d}" for i in range(len(texts))], encs, y, list(FINDINGS))


def _with_path(path: LexicalPath, ds: EncodedSet, texts: list[str]) -> EncodedSet:
    use_out_of_fold(ds.encodings, path.logits(texts))
    return ds


def test_fitted_on_the_training_patients_only_with_out_of_fold_logits() -> None:
    train, y = _cohort(60, 0)
    other, y_other = _cohort(20, 1)
    other = [t + " pericardial rub" for t in other]  # words no training note has
    path, oof = fit_lexical(train, y, FINDINGS)
    assert "pericardial" not in path.terms and "rub" not in path.terms
    wider, _ = fit_lexical(train + other, np.vstack([y, y_other]), FINDINGS)
    assert "pericardial" in wider.terms  # would be there, had those patients been fitted on
    assert path.fitted["patients"] == 60
    assert path.fitted["findings"]["a"]["patients"] == 60
    assert oof.shape == (60, 2)
    # out-of-fold: no training patient's logit comes from a fit that saw it
    assert not np.allclose(oof, path.logits(train))
    again, _ = fit_lexical(train, y, FINDINGS)
    assert np.array_equal(again.coef, path.coef)  # deterministic from the same patients
    # unknown labels are left out of that finding's regression
    y_unknown = y.copy()
    y_unknown[:10, 1] = -1
    part, _ = fit_lexical(train, y_unknown, FINDINGS)
    assert part.fitted["findings"]["b"]["patients"] == 50
    assert part.fitted["findings"]["a"]["patients"] == 60


def _model(n: int = 80) -> tuple[FusionModel, list[str], EncodedSet]:
    texts, y = _cohort(n, 2)
    path, _ = fit_lexical(texts, y, FINDINGS)
    config = replace(tiny_config(), lexical=path.summary(), trained=True)
    torch.manual_seed(0)
    model = FusionModel(config, path).eval()
    with torch.no_grad():
        model.lexical_scale.copy_(torch.tensor([0.7, 1.3]))
    return model, texts, _with_path(path, _encoded(texts, y, 3, "p"), texts)


def test_saved_and_loaded_bit_exactly_and_a_folder_missing_files_refused(
    tmp_path: Path,
) -> None:
    model, texts, ds = _model()
    model.save_pretrained(tmp_path / "m")
    loaded = FusionModel.from_pretrained(tmp_path / "m")
    assert loaded.lexical is not None and model.lexical is not None
    assert loaded.lexical.terms == model.lexical.terms
    for name in ("idf", "coef", "intercept"):
        assert np.array_equal(getattr(loaded.lexical, name), getattr(model.lexical, name))
    assert np.array_equal(loaded.lexical.logits(texts), model.lexical.logits(texts))
    assert np.array_equal(predict_logits(loaded, ds.encodings), predict_logits(model, ds.encodings))
    assert (tmp_path / "m" / "lexical.safetensors").is_file()
    assert not list((tmp_path / "m").glob("*.pkl"))
    # a model folder that lost its lexical files is refused, saying why
    (tmp_path / "m" / "lexical.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="copy the whole model folder"):
        FusionModel.from_pretrained(tmp_path / "m")


def test_a_model_without_the_path_has_the_weights_it_had_before() -> None:
    """No lexical path, no lexical weight: checkpoints trained before the path still load."""
    model = FusionModel(tiny_config())
    assert not any("lexical" in k for k in model.state_dict())


def test_masked_with_the_notes() -> None:
    model, _, ds = _model(40)
    batch = batch_from_encodings(model.config, ds.encodings[:8])
    assert batch.lexical is not None
    louder = replace(batch, lexical=batch.lexical * 5 + 3)
    with torch.no_grad():
        # notes present: the lexical logits move the output
        assert not torch.allclose(model(batch), model(louder))
        # notes masked (per-subset validation, Shapley) or dropped (training): they do not
        gone = without(batch, ["text"])
        assert torch.equal(model(gone), model(without(louder, ["text"])))
        drop = {"text": torch.ones(8, dtype=torch.bool)}
        assert torch.equal(model(batch, drop=drop), model(louder, drop=drop))
    # a patient without notes gets zeros, and notes encoded without the model's path are refused
    empty = batch_from_encodings(model.config, [Encodings()])
    assert empty.lexical is not None and not empty.lexical.any()
    text = ds.encodings[0].by_modality["text"]
    with pytest.raises(ValueError, match="lexical logits"):
        batch_from_encodings(model.config, [Encodings({"text": replace(text, lexical=None)})])


def test_with_the_lexical_path_the_model_matches_tfidf_where_the_signal_is_in_words() -> None:
    """Tolerance: the model's AUROC may fall 0.03 below the baseline's on 300 test patients.

    Its lexical input is the baseline's recipe fitted on the same training patients (one
    vocabulary instead of one per finding; Platt scaling is monotone), so with the noise tokens
    weighted near zero it ranks as the baseline does. It can fail when fusion learns spurious
    weight on the noise tokens from 200 training patients, or shrinks the lexical scale; the
    same model without the path must fall well below (the signal is only in the words)."""
    texts, y = _cohort(600, 4)
    tr, va, te = slice(0, 200), slice(200, 300), slice(300, 600)
    path, oof = fit_lexical(texts[tr], y[tr], FINDINGS)
    sets = {}
    for name, part in (("train", tr), ("val", va), ("test", te)):
        sets[name] = _with_path(path, _encoded(texts[part], y[part], 5, name), texts[part])
    use_out_of_fold(sets["train"].encodings, oof)
    settings = TrainSettings(epochs=40, seed=0)
    config = replace(tiny_config(), lexical=path.summary())
    with_path, _ = train_fusion(config, sets["train"], sets["val"], settings, False, path)
    plain, _ = train_fusion(tiny_config(), sets["train"], sets["val"], settings, False)
    base, _ = fit_predict(texts[tr], y[tr], texts[te])
    z = predict_logits(with_path, sets["test"].encodings)
    z_plain = predict_logits(plain, sets["test"].encodings)
    for j in range(len(FINDINGS)):
        b = auroc(y[te, j], base[:, j])
        assert b > 0.65  # the words carry the finding
        assert auroc(y[te, j], z[:, j]) >= b - 0.03
        assert auroc(y[te, j], z_plain[:, j]) < b - 0.1


def test_a_sentence_is_credited_with_what_deleting_it_does_to_the_lexical_term() -> None:
    model, _, _ = _model()
    notes = [
        Note(
            "Seen on the ward. Right lower lobe consolidation. Plan reviewed.",
            "DocumentReference/1",
        )
    ]
    said = ["Seen on the ward.", "Right lower lobe consolidation.", "Plan reviewed."]
    effects = sentence_effects(model, notes, said)
    assert model.lexical is not None
    weight = model.lexical_scale.detach().numpy() / temperatures(model).numpy()
    full = model.lexical.logits([notes[0].text])[0]
    for i, sentence in enumerate(said):
        rest = notes[0].text.replace(sentence, " ")
        expected = (full - model.lexical.logits([rest])[0]) * weight
        # exact but for word pairs across the deleted sentence's edges, none in this vocabulary
        assert np.allclose(effects[i], expected, atol=1e-6)
    assert effects[1, 0] > abs(effects[0, 0])  # the finding's own words move it most
    assert np.allclose(lexical_term(model, notes), full * weight)
