"""Evidence spans: which sentences of which note moved a finding's score, with exact offsets.

Two stages, to stay inside the explain budget on a 2-core CPU (re-running the text encoder on
every chunk, let alone Integrated Gradients through it, costs seconds):

1. Chunk level, exact: each chunk token is masked in turn in the fusion model (one batched
   forward, no text encoder); the logit drop ranks the chunks per finding.
2. Sentence level, inside the top chunks only: one forward of the text encoder over those
   chunks gives per-token hidden states; deleting a sentence is scored by re-pooling the chunk
   without the sentence's tokens (the encoder's own masked mean + L2 norm) and running fusion
   with that token. Context held fixed: the other tokens' states are not recomputed without the
   sentence -- the approximation that makes this cheap. The deletion test in the suite checks
   the ranking end to end (really deleting the spans from the notes and re-encoding).

3. The lexical path (``mmcds.explain.lexical``), where the model has one: every sentence of the
   text tokens' chunks gets the exact change of the lexical term when it is deleted, added to
   its encoder score; a sentence the encoder did not re-examine joins on that effect alone.

Offsets are character offsets into the source ``Note.text``: ``note.text[start:end] == text``.
Both directions are kept: the spans whose deletion lowers the finding's score most
(``supports``) and, fewer, those whose deletion raises it (``argues_against``). Each carries its
assertion status (``assertion``: "No acute airspace disease." is ``negated``). Boilerplate --
section headers, title lines, "LABS: reviewed.", allergies, attestation -- is never quoted
(``boilerplate``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mmcds.encoders.text import Chunk, TextEncoder
from mmcds.explain.assertion import assertion
from mmcds.explain.attribution import chunk_occlusion, logits, replaced_text_logits
from mmcds.explain.boilerplate import is_boilerplate
from mmcds.explain.lexical import lexical_term, sentence_effects
from mmcds.fusion.model import FusionBatch, FusionModel
from mmcds.records import EvidenceSpan, Note

TOP_CHUNKS = 3  # per finding, re-examined sentence by sentence
MAX_REENCODED = 8  # chunks through the text encoder per patient, over all findings
TOP_SPANS = 5  # supporting evidence spans kept per finding
TOP_AGAINST = 2  # and spans that argue against it

# A sentence ends at . ; ! ? followed by white space, or at a line break (lists, headings).
# "38.5" and "q.d." mid-token do not end one.
_BOUNDARY = re.compile(r"(?<=[.;!?])\s+|\n\s*")


@dataclass(frozen=True)
class Sentence:
    start: int  # offsets into the chunk's text
    end: int


def sentences(text: str) -> list[Sentence]:
    """Non-empty sentence spans of ``text`` with surrounding white space trimmed."""
    out: list[Sentence] = []
    cursor = 0
    for match in [*_BOUNDARY.finditer(text), None]:
        stop = match.start() if match else len(text)
        piece = text[cursor:stop]
        lead = len(piece) - len(piece.lstrip())
        body = piece.strip()
        if body:
            out.append(Sentence(cursor + lead, cursor + lead + len(body)))
        if match:
            cursor = match.end()
    return out


def _hidden(
    encoder: TextEncoder, texts: list[str]
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Last hidden states (K, T, D), attention mask (K, T), offsets (K, T, 2); specials (0, 0)."""
    batch = encoder.tokenizer(
        texts,
        padding=True,
        truncation=False,
        return_tensors="pt",
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        verbose=False,
    )
    offsets = batch.pop("offset_mapping").numpy()
    special = batch.pop("special_tokens_mask").numpy().astype(bool)
    offsets[special] = -1  # a special token belongs to no sentence
    inputs = {k: v.to(encoder.device) for k, v in batch.items()}
    with torch.inference_mode():
        hidden = encoder.model(**inputs).last_hidden_state.float().cpu()
    return hidden, batch["attention_mask"].float(), offsets


def _pool(hidden: torch.Tensor, keep: torch.Tensor) -> np.ndarray:
    pooled = (hidden * keep[:, None]).sum(dim=0) / keep.sum().clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=0).numpy()


def evidence_spans(
    encoder: TextEncoder,
    fusion: FusionModel,
    batch: FusionBatch,
    notes: Sequence[Note],
    spans: Sequence[str],
    top_spans: int = TOP_SPANS,
) -> list[EvidenceSpan]:
    """Evidence per finding for the text tokens of ``batch`` (``spans`` as the pipeline wrote
    them: ``<note_ref>#<start>-<end>``): per finding, the supporting spans best first, then the
    spans that argue against it, strongest first."""
    n_tokens = int(batch.mask["text"][0].sum())
    if n_tokens == 0:
        return []
    names = fusion.config.findings
    by_span = {c.span: c for c in encoder.chunks(notes)}
    missing = [s for s in spans[:n_tokens] if s not in by_span]
    if missing:
        raise ValueError(
            f"text tokens {missing[:3]} do not match the notes' chunks: the encodings were made "
            "from other notes or another chunking; explain the analysis they came from"
        )
    chunks: list[Chunk] = [by_span[s] for s in spans[:n_tokens]]
    drops = chunk_occlusion(fusion, batch)  # (n_tokens, F)
    if n_tokens == 1:  # masking the only chunk masks the notes, lexical path included: that
        drops = drops - lexical_term(fusion, notes)[None, :]  # part is scored by sentence
    chosen: list[int] = []
    for f in range(len(names)):
        for pos in np.argsort(-drops[:, f])[:TOP_CHUNKS]:
            if drops[pos, f] > 0 and int(pos) not in chosen:
                chosen.append(int(pos))
        for pos in np.argsort(drops[:, f])[:1]:  # the chunk that argues against it most
            if drops[pos, f] < 0 and int(pos) not in chosen:
                chosen.append(int(pos))
    # the strongest chunks over all findings first, if the cap bites
    chosen = sorted(chosen, key=lambda p: -float(np.abs(drops[p]).max()))[:MAX_REENCODED]
    candidates: list[tuple[int, Sentence | None]] = []  # (token position, sentence or whole)
    replacements: list[tuple[int, np.ndarray]] = []
    split = {pos: sentences(chunk.text) for pos, chunk in enumerate(chunks)}
    # a one-sentence chunk needs no encoder pass: deleting its sentence is masking its token
    for pos in chosen:
        if len(split[pos]) <= 1:
            candidates.append((pos, None))
    multi = [pos for pos in chosen if len(split[pos]) > 1]
    if multi:
        hidden, attention, offsets = _hidden(encoder, [chunks[p].text for p in multi])
        for row, pos in enumerate(multi):
            starts, ends = offsets[row, :, 0], offsets[row, :, 1]
            for sent in split[pos]:
                inside = (starts >= sent.start) & (ends <= sent.end) & (ends > starts)
                keep = attention[row] * torch.from_numpy(~inside).float()
                candidates.append((pos, sent))
                replacements.append((pos, _pool(hidden[row], keep)))
    full = logits(fusion, batch).numpy()[0].astype(np.float64)
    replaced = replaced_text_logits(fusion, batch, replacements)
    scores = np.zeros((len(candidates), len(names)))
    r = 0
    for c, (pos, maybe) in enumerate(candidates):
        if maybe is None:
            scores[c] = drops[pos]
        else:
            scores[c] = full - replaced[r]
            r += 1
    candidates, scores = _add_lexical(fusion, notes, chunks, split, candidates, scores)
    out: list[EvidenceSpan] = []
    for f, name in enumerate(names):
        seen: set[tuple[str, int, int]] = set()  # overlapping chunks repeat a sentence
        for sign, limit in ((1.0, top_spans), (-1.0, TOP_AGAINST)):
            kept = 0
            for c in np.argsort(-sign * scores[:, f]):
                if sign * scores[c, f] <= 0 or kept >= limit:
                    break
                pos, picked = candidates[int(c)]
                chunk = chunks[pos]
                whole = split[pos][0] if split[pos] else Sentence(0, len(chunk.text))
                a, b = (picked.start, picked.end) if picked else (whole.start, whole.end)
                start, end = chunk.start + a, chunk.start + b
                quoted = chunk.text[a:b]
                # never shown as evidence: a header's or a template's deletion moves the
                # mean-pooled embedding, but "LABS: reviewed." tells a clinician nothing
                if (chunk.note_ref, start, end) in seen or is_boilerplate(
                    quoted, section=chunk.section, first_line=start == 0
                ):
                    continue
                seen.add((chunk.note_ref, start, end))
                kept += 1
                out.append(
                    EvidenceSpan(
                        name,
                        chunk.note_ref,
                        chunk.section,
                        start,
                        end,
                        quoted,
                        float(scores[c, f]),
                        direction="supports" if sign > 0 else "argues_against",
                        assertion=assertion(quoted, name),
                    )
                )
    return out


def _add_lexical(
    fusion: FusionModel,
    notes: Sequence[Note],
    chunks: Sequence[Chunk],
    split: dict[int, list[Sentence]],
    candidates: list[tuple[int, Sentence | None]],
    scores: np.ndarray,
) -> tuple[list[tuple[int, Sentence | None]], np.ndarray]:
    """The candidates and their scores with each sentence's lexical deletion effect added; the
    sentences not yet among them join with that effect alone."""
    if fusion.lexical is None:
        return candidates, scores
    where: dict[tuple[str, int, int], tuple[int, Sentence]] = {}
    for pos, chunk in enumerate(chunks):  # overlapping chunks repeat a sentence: once
        for sent in split[pos]:
            key = (chunk.note_ref, chunk.start + sent.start, chunk.start + sent.end)
            where.setdefault(key, (pos, sent))
    keys = list(where)
    texts = [chunks[p].text[s.start : s.end] for p, s in (where[k] for k in keys)]
    effects = sentence_effects(fusion, notes, texts)
    row = {k: i for i, k in enumerate(keys)}
    scores = scores.copy()
    for c, (pos, picked) in enumerate(candidates):
        if picked is None and not split[pos]:
            continue
        sent = picked or split[pos][0]
        key = (chunks[pos].note_ref, chunks[pos].start + sent.start, chunks[pos].start + sent.end)
        if key in row:
            scores[c] += effects[row.pop(key)]
    rest = list(row)
    added: list[tuple[int, Sentence | None]] = [where[k] for k in rest]
    more = effects[[row[k] for k in rest]].reshape(len(rest), scores.shape[1])
    return candidates + added, np.vstack([scores, more])
