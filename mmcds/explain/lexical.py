"""The lexical path's share of the sentence evidence (``mmcds.fusion.lexical``).

The fusion model adds ``scale_f * lexical_f(notes) / temperature_f`` to a finding's logit, where
``lexical_f`` is a linear function of the TF-IDF of all the patient's notes. Masking a chunk
token (the text encoder's evidence, ``mmcds.explain.text``) leaves that term untouched, so the
sentences that move it would never be quoted. Here each sentence is scored by deleting it from
the notes' term counts (its words and word pairs, once) and recomputing the lexical logit: the
exact change of the model's logit through that path, in the same units (logit over temperature)
as the encoder's deletion scores, to which it is added. What it does not capture: a word pair
spanning the deleted sentence's edges, and, for the encoder's part, that sentences outside the
re-encoded chunks are scored by the lexical path alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from mmcds.explain.attribution import temperatures
from mmcds.fusion.lexical import note_text
from mmcds.fusion.model import FusionModel
from mmcds.records import Note


def weight(fusion: FusionModel) -> np.ndarray:
    """(F,) what one unit of lexical logit adds to each explained logit."""
    scale = fusion.lexical_scale.detach().float().cpu()
    return (scale / temperatures(fusion)).numpy().astype(np.float64)


def lexical_term(fusion: FusionModel, notes: Sequence[Note]) -> np.ndarray:
    """(F,) the lexical path's whole addition to the explained logits (zeros without a path)."""
    if fusion.lexical is None or not notes:
        return np.zeros(len(fusion.config.findings))
    return fusion.lexical.logits([note_text(notes)])[0] * weight(fusion)


def sentence_effects(
    fusion: FusionModel, notes: Sequence[Note], texts: Sequence[str]
) -> np.ndarray:
    """(len(texts), F): how much deleting each sentence (a piece of ``notes``) lowers each
    explained logit through the lexical path; zeros for a model without one."""
    path = fusion.lexical
    if path is None or not texts:
        return np.zeros((len(texts), len(fusion.config.findings)))
    full = path.counts([note_text(notes)])
    each = path.counts(texts)
    rest = sp.csr_matrix(sp.vstack([full] * len(texts)) - each)
    rest.data = np.maximum(rest.data, 0.0)  # a sentence's terms are in the notes; guard anyway
    rest.eliminate_zeros()
    drop = path.logits_from_counts(full) - path.logits_from_counts(rest)
    return np.asarray(drop * weight(fusion), np.float64)
