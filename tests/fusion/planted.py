"""A planted encoded cohort whose truth is known, and a tiny fusion config (test helpers)."""

from __future__ import annotations

import numpy as np

from mmcds.fusion.data import EncodedSet
from mmcds.fusion.model import FusionConfig
from mmcds.records import MODALITIES, Encodings, ModalityEncoding

FINDINGS = ["a", "b"]
DIMS = {"image": 6, "text": 8, "labs": 5}


def planted(n: int, seed: int, missing: float = 0.2, strength: float = 1.0) -> EncodedSet:
    """Finding ``a`` needs image + text (each carries half the signal), ``b`` shows in labs.

    Every modality is absent for a fraction ``missing`` of the patients.
    """
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 2)) < 0.4).astype(np.float32)
    encs = []
    for i in range(n):
        enc = Encodings()
        shift = {
            "image": 1.2 * strength * y[i, 0],
            "text": 1.2 * strength * y[i, 0],
            "labs": 1.5 * strength * y[i, 1],
        }
        for m in MODALITIES:
            d = DIMS[m]
            if rng.random() < missing:
                continue
            k = int(rng.integers(1, 4))
            tokens = rng.normal(size=(k, d)).astype(np.float32)
            tokens[:, 0] += shift[m]
            enc.by_modality[m] = ModalityEncoding(m, tokens, [f"{m}{j}" for j in range(k)], m, [])
        encs.append(enc)
    sites: list[str | None] = ["A" if i % 2 else "B" for i in range(n)]
    sex: list[str | None] = ["female" if i % 3 else "male" for i in range(n)]
    bands: list[str | None] = ["18-39" if i % 4 else "65-79" for i in range(n)]
    return EncodedSet([f"p{i:04d}" for i in range(n)], encs, y, FINDINGS, sites, sex, bands)


def tiny_config() -> FusionConfig:
    return FusionConfig(
        findings=FINDINGS,
        input_dims=dict(DIMS),
        d_model=16,
        n_heads=2,
        dropout=0.0,
        max_tokens={"image": 4, "text": 4, "labs": 4},
    )
