"""Explanations: geometry, faithfulness sanity checks, exact Shapley sums, summary, storage.

Models are the tiny local CNN/ViT, the real all-MiniLM-L6-v2 and a seeded, untrained fusion
model: an explanation must be faithful to whatever model it explains, so these checks hold for
random weights too. Figures on the trained model are in benchmarks/explain.py.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr
from sqlalchemy import delete

from mmcds.encoders.image import ImageEncoder
from mmcds.encoders.labs import empty_lab_frame
from mmcds.encoders.sections import is_label
from mmcds.explain.assertion import assertion
from mmcds.explain.attribution import logits
from mmcds.explain.boilerplate import is_boilerplate
from mmcds.explain.image import (
    CNN_METHOD,
    VIT_METHOD,
    boxes_from_heatmap,
    cnn_target,
    image_saliency,
    occluders,
    occlusion_sensitivity,
    probe_geometry,
)
from mmcds.explain.stage import explain
from mmcds.explain.summary import LINE_LIMIT, evidence_for, summary_line, summary_markdown
from mmcds.fusion.model import batch_from_encodings
from mmcds.fusion.pipeline import Pipeline
from mmcds.records import (
    Analysis,
    Encodings,
    Explanation,
    FindingScore,
    ImageSaliency,
    ModalityEncoding,
    Note,
    Patient,
    PatientRecord,
)
from mmcds.service.analysis_store import AnalysisStore
from mmcds.training.dataset import Example


@pytest.fixture(scope="module")
def analysed(pipeline: Pipeline, examples: list[Example]) -> list[tuple[Analysis, Explanation]]:
    out = []
    for ex in examples:
        analysis = pipeline.analyse(ex.record)
        out.append((analysis, explain(pipeline, analysis)))
    return out


def test_geometry_matches_the_processors(pipeline: Pipeline) -> None:
    # CNN (tiny builder): plain resize to 224 x 224, no centre crop -- a chest film's corners
    # (costophrenic angles, apices) must stay on the model's grid
    g = probe_geometry(pipeline.cnn, (256, 256))
    assert g.input_hw == (224, 224)
    assert g.scale_x == pytest.approx(256 / 224, abs=0.02)
    g = probe_geometry(pipeline.cnn, (320, 288))
    assert g.scale_y == pytest.approx(320 / 224, abs=0.02)
    assert g.scale_x == pytest.approx(288 / 224, abs=0.02)
    # the centre of input pixel 0 sits half a source pixel in: nothing cut off
    assert g.offset_x == pytest.approx(0.5 * (288 / 224 - 1), abs=0.6)
    # ViT: plain resize to 224 x 224, nothing cropped
    g = probe_geometry(pipeline.vit, (320, 288))
    assert g.scale_y == pytest.approx(320 / 224, abs=0.02)
    assert g.scale_x == pytest.approx(288 / 224, abs=0.02)


def test_heatmaps_boxes_and_overlays_on_the_original_grid(
    analysed: list[tuple[Analysis, Explanation]],
) -> None:
    for analysis, exp in analysed:
        shapes = {im.sop_uid: im.pixels.shape for im in analysis.record.images}
        findings = analysis.assessment.findings
        assert len(exp.images) == 2 * len(shapes) * len(findings)
        for s in exp.images:
            h, w = shapes[s.sop_uid]
            # the cohort's images are under 1,024 px: their review grid is their own
            assert max(h, w) <= 1024 and s.original_shape == (h, w)
            assert s.heatmap.shape == (h, w) and s.heatmap.dtype == np.float32
            assert s.heatmap.min() >= 0.0 and s.heatmap.max() <= 1.0
            assert s.boxes, "a non-zero heatmap has at least one region"
            for x0, y0, x1, y1, score in s.boxes:
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and 0 < score <= 1
            # only the overlays the report carries are composed (the CNN's)
            assert (s.overlay_png is not None) == (s.method == CNN_METHOD) == s.in_report
            if s.overlay_png is None:
                continue
            png = Image.open(io.BytesIO(s.overlay_png))
            assert png.format == "PNG" and png.size[1] >= h and png.size[0] > w


def test_randomised_cnn_changes_the_heatmaps(
    pipeline: Pipeline, analysed: list[tuple[Analysis, Explanation]]
) -> None:
    """Adebayo et al. 2018: a saliency method that ignores the weights is an edge detector."""
    random_cnn = pipeline.cnn.randomised(123)
    assert random_cnn.backend == "torch" and random_cnn.model_id != pipeline.cnn.model_id
    rhos = []
    for analysis, exp in analysed:
        batch = batch_from_encodings(pipeline.fusion.config, [analysis.encodings])
        after = image_saliency(
            random_cnn, pipeline.vit, pipeline.fusion, batch, analysis.record.images
        )
        before = {(s.sop_uid, s.finding): s.heatmap for s in exp.images if s.method == CNN_METHOD}
        for s in after:
            if s.method == CNN_METHOD:
                old = before[(s.sop_uid, s.finding)]
                if old.std() == 0 or s.heatmap.std() == 0:  # a flat map: no shared ordering
                    rhos.append(0.0)
                    continue
                rhos.append(float(spearmanr(old.ravel(), s.heatmap.ravel())[0]))
    # the bound: heatmaps share at most a weak ordering
    assert float(np.mean(rhos)) < 0.5, rhos


def test_occlusion_sensitivity_marks_what_the_score_reads() -> None:
    """Scores that read one square of the input: only squares hiding it drop the score and the
    map peaks inside it, whether a dark fill hides it (a dense square on air) or a grey one (a
    lucent square); rises are not counted; every score gets its own map."""
    image = torch.full((3, 224, 224), -1.0)  # dark: air
    image[:, 100:130, 40:70] = 0.0  # dense as soft tissue: grey hides nothing here
    grey, dark = occluders(image)
    assert grey.shape == dark.shape == (3, 1, 1)
    assert grey.eq(0).all() and dark.eq(-1).all()
    tinted = image + torch.tensor([0.0, 0.1, 0.3])[:, None, None]  # ImageNet-normalised grey
    assert torch.allclose(occluders(tinted)[1].flatten(), torch.tensor([-1.0, -0.9, -0.7]))
    dense, lucent = (slice(100, 130), slice(40, 70)), (slice(10, 40), slice(180, 210))

    def score(x: torch.Tensor) -> torch.Tensor:
        def read(where: tuple[slice, slice]) -> torch.Tensor:
            return x[:, :, where[0], where[1]].mean(dim=(1, 2, 3))

        return torch.stack([read(dense), -read(lucent), read(lucent)], dim=1)

    maps = occlusion_sensitivity(image, score).numpy()
    assert maps.shape == (3, 224, 224)
    for m, (ys, xs) in zip(maps[:2], (dense, lucent), strict=True):
        y, x = np.unravel_index(int(np.argmax(m)), m.shape)
        assert ys.start <= y < ys.stop and xs.start <= x < xs.stop
        inside = np.zeros(m.shape, bool)  # pixels some square that overlaps the region covers
        inside[max(0, ys.start - 31) : ys.stop + 31, max(0, xs.start - 31) : xs.stop + 31] = True
        assert m[~inside].max() == 0.0
    assert maps[2].max() == 0.0  # hiding made it rise: not evidence for it


def test_cnn_heatmap_explains_its_own_head_when_it_has_one(
    pipeline: Pipeline, examples: list[Example], tmp_path: Path
) -> None:
    """A fine-tuned CNN checkpoint (a classifier) is explained through its own finding logit:
    replacing the fusion model leaves its heatmaps unchanged, while the ViT's (which explain the
    fusion logit) move."""
    from mmcds.findings import SYNTH_FINDINGS
    from mmcds.fusion.pretrain import PretrainSettings, pretrain_image_encoder

    images = [im for ex in examples for im in ex.record.images]
    labels = np.array(
        [[ex.labels[f] for f in SYNTH_FINDINGS] for ex in examples for _ in ex.record.images],
        np.float32,
    )
    pixels = [im.pixels for im in images]
    settings = PretrainSettings(epochs=1)
    pretrain_image_encoder(
        "cnn", SYNTH_FINDINGS, pixels, labels, pixels, labels, tmp_path / "cnn", settings, False
    )
    cnn = ImageEncoder.from_pretrained(str(tmp_path / "cnn"))
    assert cnn.head is not None and cnn.labels == list(SYNTH_FINDINGS)
    assert all(cnn_target(cnn, f) == "head" for f in SYNTH_FINDINGS)
    assert cnn_target(pipeline.cnn, SYNTH_FINDINGS[0]) == "fusion"  # a plain backbone
    other = copy.deepcopy(pipeline.fusion)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in other.parameters():
            p.normal_(0.0, 0.2)
    analysis = pipeline.analyse(examples[0].record)
    batch = batch_from_encodings(pipeline.fusion.config, [analysis.encodings])
    imgs = analysis.record.images
    a = image_saliency(cnn, pipeline.vit, pipeline.fusion, batch, imgs)
    b = image_saliency(cnn, pipeline.vit, other, batch, imgs)
    vit_moved = False
    for sa, sb in zip(a, b, strict=True):
        if sa.method == CNN_METHOD:
            np.testing.assert_allclose(sa.heatmap, sb.heatmap, atol=1e-6)
        else:
            assert sa.method == VIT_METHOD
            vit_moved |= not np.allclose(sa.heatmap, sb.heatmap, atol=1e-4)
    assert vit_moved


def test_modality_shapley_sums_to_full_minus_empty(
    pipeline: Pipeline, analysed: list[tuple[Analysis, Explanation]]
) -> None:
    empty = pipeline.fusion.predict_proba([Encodings()])[0]
    for analysis, exp in analysed:
        full = [f.probability for f in analysis.assessment.findings]
        for i, m in enumerate(exp.modalities):
            assert sum(m.values.values()) == pytest.approx(m.full - m.base, abs=1e-9)
            assert m.full == pytest.approx(full[i], abs=1e-5)
            assert m.base == pytest.approx(float(empty[i]), abs=1e-5)


def test_lab_contributions_sum_to_the_labs_effect(
    pipeline: Pipeline, analysed: list[tuple[Analysis, Explanation]]
) -> None:
    for analysis, exp in analysed:
        labs = analysis.encodings.by_modality["labs"]
        unmeasured = dataclasses.replace(
            labs, tokens=pipeline.labs.encode(empty_lab_frame()).tokens
        )
        without = Encodings({**analysis.encodings.by_modality, "labs": unmeasured})
        p_without = pipeline.fusion.predict_proba([without])[0]
        for i, f in enumerate(analysis.assessment.findings):
            rows = [c for c in exp.labs if c.finding == f.finding]
            assert sum(c.contribution for c in rows) == pytest.approx(
                f.probability - p_without[i], abs=1e-5
            )
            for c in rows:
                if c.value is None:
                    assert c.contribution == 0.0 and c.unit is None
                else:
                    assert c.unit and c.time is not None


def test_evidence_offsets_return_the_quoted_text(
    analysed: list[tuple[Analysis, Explanation]],
) -> None:
    seen = 0
    for analysis, exp in analysed:
        notes = {n.reference: n.text for n in analysis.record.notes}
        for span in exp.evidence:
            assert notes[span.note_ref][span.start : span.end] == span.text
            assert span.text.strip() == span.text and span.score != 0
            assert span.direction == ("supports" if span.score > 0 else "argues_against")
            assert span.assertion == assertion(span.text, span.finding)
            assert not is_label(span.text, first_line=span.start == 0), span.text
            assert not is_boilerplate(span.text, section=span.section), span.text
            seen += 1
    assert seen > 0


def test_negated_evidence_is_labelled_and_boilerplate_never_quoted(pipeline: Pipeline) -> None:
    # the note: a negated impression beside template lines and an attestation, so the
    # impression is the one sentence left to quote for every finding, whichever way it points
    text = (
        "LABS: reviewed.\n"
        "ALLERGIES: NKDA\n"
        "IMPRESSION: No acute airspace disease.\n"
        "ATTESTATION: I have personally seen and examined the patient.\n"
    )
    record = PatientRecord(Patient("p-neg"), notes=[Note(text, "DocumentReference/n1")])
    analysis = pipeline.analyse(record)
    exp = explain(pipeline, analysis, overlays=False)
    quoted = {e.text for e in exp.evidence}
    assert quoted, "no evidence at all"
    assert not quoted & {"LABS: reviewed.", "ALLERGIES: NKDA"}
    assert not any("personally" in q for q in quoted)
    negated = [e for e in exp.evidence if "airspace disease" in e.text]
    assert negated and all(e.assertion == "negated" for e in negated)
    # whichever way the (untrained) model read it, the card says it is a negation
    md = summary_markdown(analysis, exp)
    assert "“IMPRESSION: No acute airspace disease.” (negated)" in md


@pytest.mark.parametrize(
    ("line", "first_line", "label"),
    [
        ("PHYSICAL EXAM:", False, True),
        ("  Assessment and plan:", False, True),
        ("PROGRESS NOTE - HOSPITAL DAY 2", True, True),
        ("PROGRESS NOTE - HOSPITAL DAY 2", False, False),  # capitals mid-note may be a finding
        ("NO PNEUMOTHORAX.", True, False),
        ("IMPRESSION: Right lower lobe consolidation.", False, False),
        ("Temp 38.9 C, productive cough.", True, False),
    ],
)
def test_labels_are_told_from_sentences(line: str, first_line: bool, label: bool) -> None:
    assert is_label(line, first_line=first_line) is label


def _text_logits(
    pipeline: Pipeline, analysis: Analysis, notes: list[Note], memo: dict[str, np.ndarray]
) -> np.ndarray:
    """Finding logits after re-encoding edited notes (unchanged chunks reuse their embedding)."""
    chunks = pipeline.text.chunks(notes)
    todo = [c for c in chunks if c.text not in memo]
    for c, vec in zip(todo, pipeline.text.embed_chunks(todo), strict=True):
        memo[c.text] = vec
    old = analysis.encodings.by_modality["text"]
    tokens = np.stack([memo[c.text] for c in chunks]).astype(np.float32)
    text = ModalityEncoding(
        "text", tokens, [c.span for c in chunks], old.model_id, old.input_hashes
    )
    enc = Encodings({**analysis.encodings.by_modality, "text": text})
    return logits(pipeline.fusion, batch_from_encodings(pipeline.fusion.config, [enc])).numpy()[0]


def _delete(notes: list[Note], cuts: dict[str, list[tuple[int, int]]]) -> list[Note]:
    out = []
    for n in notes:
        keep = np.ones(len(n.text), bool)
        for a, b in cuts.get(n.reference, []):
            keep[a:b] = False
        text = "".join(ch for ch, k in zip(n.text, keep, strict=True) if k)
        out.append(Note(text, n.reference, n.note_type, n.date))
    return out


def test_deleting_top_evidence_lowers_the_score_more_than_random_spans(
    pipeline: Pipeline, analysed: list[tuple[Analysis, Explanation]]
) -> None:
    rng = np.random.default_rng(0)
    top_drops, random_drops = [], []
    for analysis, exp in analysed:
        notes = analysis.record.notes
        memo: dict[str, np.ndarray] = {}
        base = _text_logits(pipeline, analysis, notes, memo)
        for f, finding in enumerate(pipeline.fusion.config.findings):
            spans = [e for e in exp.evidence if e.finding == finding][:3]
            if not spans:
                continue
            cuts: dict[str, list[tuple[int, int]]] = {}
            for s in spans:
                cuts.setdefault(s.note_ref, []).append((s.start, s.end))
            top_drops.append(
                base[f] - _text_logits(pipeline, analysis, _delete(notes, cuts), memo)[f]
            )
            for _ in range(3):  # random spans of the same lengths, anywhere in the notes
                rand: dict[str, list[tuple[int, int]]] = {}
                for s in spans:
                    note = notes[int(rng.integers(len(notes)))]
                    length = min(s.end - s.start, len(note.text))
                    a = int(rng.integers(0, len(note.text) - length + 1))
                    rand.setdefault(note.reference, []).append((a, a + length))
                random_drops.append(
                    base[f] - _text_logits(pipeline, analysis, _delete(notes, rand), memo)[f]
                )
    assert top_drops, "no evidence to delete"
    assert np.mean(top_drops) > 0
    assert np.mean(top_drops) > np.mean(random_drops), (top_drops, random_drops)


def test_summary_words_follow_the_operating_points(
    analysed: list[tuple[Analysis, Explanation]],
) -> None:
    analysis, exp = analysed[0]
    assert "UNTRAINED" in summary_line(analysis) and len(summary_line(analysis)) < LINE_LIMIT
    scores = [
        FindingScore("pneumonia", 0.91, 0.3, 0.8),
        FindingScore("heart_failure", 0.45, 0.3, 0.8),
        FindingScore("pleural_effusion", 0.05, 0.3, 0.8),
        FindingScore("pneumothorax", 0.02, 0.3, 0.8),
    ]
    assessment = dataclasses.replace(
        analysis.assessment, findings=scores, trained=True, modalities_used=["image", "text"]
    )
    trained = Analysis(analysis.record, analysis.encodings, assessment)
    line = summary_line(trained)
    assert len(line) < LINE_LIMIT
    assert "Pneumonia high (91%)" in line and "Heart failure possible (45%)" in line
    assert "Pleural" not in line and "inputs incomplete" in line
    md = summary_markdown(trained, exp)
    assert "**Pneumonia**: high probability (91%)" in md
    assert "no labs available" in md and "preliminary" in md.lower() and "Limits" in md
    assert "- Notes: supports: “" in md or "- Notes: argues against: “" in md
    assert "- Contribution by input:" in md
    assert "−0" not in md.split("- Contribution by input:")[1].splitlines()[0]
    assert "pp = percentage points of probability" in md


def _blob_map(
    finding: str, cy: int, cx: int, method: str = "gradcam-occlusion-cnn"
) -> ImageSaliency:
    yy, xx = np.mgrid[0:100, 0:120]
    heat = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 200.0).astype(np.float32)
    return ImageSaliency("1.2.3", finding, method, heat, boxes_from_heatmap(heat))


def test_evidence_says_when_two_findings_point_at_one_region() -> None:
    # heart failure peaks next to the effusion's peak, pneumonia far from both
    maps = [
        _blob_map("heart_failure", 70, 30),
        _blob_map("pleural_effusion", 74, 33),
        _blob_map("pneumonia", 20, 100),
    ]
    exp = Explanation("a", images=maps)
    flagged = ["heart_failure", "pleural_effusion", "pneumonia"]
    hf = evidence_for(exp, "heart_failure", flagged).image
    assert hf is not None and hf.endswith("the same region as the pleural effusion evidence")
    eff = evidence_for(exp, "pleural_effusion", flagged).image
    assert eff is not None and eff.endswith("the same region as the heart failure evidence")
    assert "same region" not in (evidence_for(exp, "pneumonia", flagged).image or "")
    # a finding that is not shown is never named, nor is a map of another image
    assert "same region" not in (evidence_for(exp, "heart_failure", ["heart_failure"]).image or "")
    other_image = dataclasses.replace(maps[1], sop_uid="9.9.9")
    exp2 = Explanation("b", images=[maps[0], other_image])
    assert "same region" not in (evidence_for(exp2, "heart_failure", flagged).image or "")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_store_round_trip(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    analysed: list[tuple[Analysis, Explanation]],
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'store.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    store = AnalysisStore(url)
    analysis, exp = analysed[0]
    with store.engine.begin() as conn:  # PostgreSQL outlives the test session
        for table in (store.analyses, store.blobs):
            conn.execute(delete(table).where(table.c.identifier == analysis.identifier))
    assert store.get(analysis.identifier) is None
    assert store.put(analysis, exp) is True
    assert store.put(analysis, exp) is False
    got = store.get(analysis.identifier)
    assert got is not None and got.patient_id == analysis.record.patient.id
    back = got.explanation
    assert back.evidence == exp.evidence and back.modalities == exp.modalities
    assert back.summary_html == exp.summary_html
    assert [(c.lab, c.value, c.contribution) for c in back.labs] == [
        (c.lab, c.value, c.contribution) for c in exp.labs
    ]
    for a, b in zip(back.images, exp.images, strict=True):
        assert np.array_equal(a.heatmap, b.heatmap) and a.boxes == b.boxes
        assert a.original_shape == b.original_shape == b.image_shape
        assert a.overlay_png == b.overlay_png
    s = next(s for s in exp.images if s.overlay_png is not None)
    assert store.overlay(analysis.identifier, s.sop_uid, s.finding, s.method) == s.overlay_png
    assert (
        got.assessment["findings"][0]["probability"] == analysis.assessment.findings[0].probability
    )
    store.close()
