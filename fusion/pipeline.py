"""The one pipeline: record -> encodings -> assessment, used by the hook, the CLI and batch jobs.

Encoding is the expensive stage (DESIGN §3), so every embedding goes through the cache keyed by
(content hash, model id): a second hook for the same data only runs fusion.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from mmcds.encoders.image import ImageEncoder
from mmcds.encoders.labs import LabEncoder
from mmcds.encoders.text import TextEncoder
from mmcds.encoders.tiny import build_tiny_cnn, build_tiny_vit
from mmcds.findings import SYNTH_FINDINGS, Finding, resolve
from mmcds.fusion.gate import assess
from mmcds.fusion.lexical import note_text
from mmcds.fusion.model import FusionConfig, FusionModel
from mmcds.fusion.ood import OodDetector
from mmcds.records import (
    Analysis,
    Assessment,
    Encodings,
    ModalityEncoding,
    PatientRecord,
    content_hash,
)
from mmcds.settings import Settings
from mmcds.store import EmbeddingCache

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(
        self,
        cnn: ImageEncoder,
        vit: ImageEncoder,
        text: TextEncoder,
        labs: LabEncoder,
        fusion: FusionModel,
        cache: EmbeddingCache | None = None,
        ood: OodDetector | None = None,
    ) -> None:
        self.cnn, self.vit, self.text, self.labs, self.fusion = cnn, vit, text, labs, fusion
        self.cache = cache
        self.ood = ood

    @classmethod
    def from_settings(cls, settings: Settings) -> Pipeline:
        cnn_path, vit_path = image_model_paths(settings)
        # "auto" is resolved per encoder: one may have an int8 graph and the other not
        cnn = ImageEncoder.from_pretrained(cnn_path, backend=settings.image_backend)
        vit = ImageEncoder.from_pretrained(vit_path, backend=settings.image_backend)
        text = TextEncoder.from_pretrained(settings.text_model or None)
        if settings.fusion_model:
            fusion = FusionModel.from_pretrained(settings.fusion_model)
            labs = LabEncoder.from_pretrained(settings.fusion_model)
        else:
            labs = LabEncoder()
            fusion = untrained_fusion(cnn, vit, text, labs)
        cache = EmbeddingCache(settings.database_url)
        ood = OodDetector.load(Path(settings.fusion_model)) if settings.fusion_model else None
        return cls(cnn, vit, text, labs, fusion, cache, ood)

    # --- encode -----------------------------------------------------------------------------

    def encode(self, record: PatientRecord) -> Encodings:
        encodings = Encodings()
        if record.images:
            encodings.by_modality["image"] = self._encode_images(record)
        if record.notes:
            text = self._encode_text(record)
            if text.tokens.shape[0]:
                encodings.by_modality["text"] = text
        if not record.labs.empty:
            encodings.by_modality["labs"] = self.labs.encode(record.labs)
        return encodings

    def _cached(self, keys: list[str], model_id: str) -> dict[str, np.ndarray]:
        if self.cache is None:
            return {}
        found = self.cache.get_many([(k, model_id) for k in keys])
        return {k: v for (k, _), v in found.items()}

    def _embed_images(self, encoder: ImageEncoder, record: PatientRecord) -> np.ndarray:
        keys = [img.content_hash for img in record.images]
        hits = self._cached(keys, encoder.model_id)
        todo = [i for i, k in enumerate(keys) if k not in hits]
        if todo:
            fresh = encoder.embed([record.images[i].pixels for i in todo])
            for i, vec in zip(todo, fresh, strict=True):
                hits[keys[i]] = vec
                if self.cache is not None:
                    self.cache.put(keys[i], encoder.model_id, vec)
        return np.stack([hits[k] for k in keys]).astype(np.float32)

    def _encode_images(self, record: PatientRecord) -> ModalityEncoding:
        # One token per image: the CNN's and the ViT's views of it side by side.
        tokens = np.concatenate(
            [self._embed_images(self.cnn, record), self._embed_images(self.vit, record)], axis=1
        )
        return ModalityEncoding(
            modality="image",
            tokens=tokens,
            spans=[img.sop_uid for img in record.images],
            model_id=f"{self.cnn.model_id}+{self.vit.model_id}",
            input_hashes=[img.content_hash for img in record.images],
        )

    def _encode_text(self, record: PatientRecord) -> ModalityEncoding:
        chunks = self.text.chunks(record.notes)
        keys = [content_hash(c.text) for c in chunks]
        hits = self._cached(keys, self.text.model_id)
        todo = [i for i, k in enumerate(keys) if k not in hits]
        if todo:
            fresh = self.text.embed_chunks([chunks[i] for i in todo])
            for i, vec in zip(todo, fresh, strict=True):
                hits[keys[i]] = vec
                if self.cache is not None:
                    self.cache.put(keys[i], self.text.model_id, vec)
        dim = self.fusion.config.input_dims["text"]
        tokens = (
            np.stack([hits[k] for k in keys]).astype(np.float32)
            if keys
            else np.zeros((0, dim), np.float32)
        )
        # the model's own lexical path over the whole note text: sparse arithmetic, no encoder
        lexical = self.fusion.lexical
        return ModalityEncoding(
            modality="text",
            tokens=tokens,
            spans=[f"{c.note_ref}#{c.start}-{c.end}" for c in chunks],
            model_id=self.text.model_id,
            input_hashes=[n.content_hash for n in record.notes],
            lexical=lexical.logits([note_text(record.notes)])[0] if lexical else None,
        )

    # --- fuse -------------------------------------------------------------------------------

    def fuse(
        self, encodings: Encodings, site: str | None = None, record: PatientRecord | None = None
    ) -> Assessment:
        """Calibrated scores and, per finding, whether it may be acted on (``fusion.gate``)."""
        return assess(self.fusion, encodings, site, record, self.ood)

    def analyse(self, record: PatientRecord) -> Analysis:
        encodings = self.encode(record)
        site = next((img.site for img in record.images if img.site), None)
        return Analysis(record, encodings, self.fuse(encodings, site, record))


def image_model_paths(settings: Settings) -> tuple[str, str]:
    """The CNN's and the ViT's checkpoints: set explicitly, else the trained model folder's own
    fine-tuned encoders (cnn/, vit/), else tiny local models built once under model_dir."""
    model_dir = Path(settings.model_dir)
    trained = Path(settings.fusion_model) if settings.fusion_model else None
    cnn_path = settings.cnn_model or (
        str(trained / "cnn")
        if trained and (trained / "cnn" / "config.json").is_file()
        else str(_ensure(model_dir / "tiny-cnn", build_tiny_cnn))
    )
    vit_path = settings.vit_model or (
        str(trained / "vit")
        if trained and (trained / "vit" / "config.json").is_file()
        else str(_ensure(model_dir / "tiny-vit", build_tiny_vit))
    )
    return cnn_path, vit_path


def _ensure(path: Path, build: Callable[[Path], Path]) -> Path:
    """Build a tiny local checkpoint once (no model hub is reachable on these machines)."""
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        build(path)
    return path


def untrained_fusion(
    cnn: ImageEncoder,
    vit: ImageEncoder,
    text: TextEncoder,
    labs: LabEncoder,
    findings: Sequence[Finding] | None = None,
) -> FusionModel:
    """A randomly initialised (seeded) fusion model wired to these encoders' widths, with
    ``findings`` (default: the synthetic cohort's) as its outputs."""
    image_dim = cnn.dim + vit.dim
    entries = list(findings) if findings else resolve(SYNTH_FINDINGS)
    config = FusionConfig(
        findings=[f.name for f in entries],
        finding_entries={f.name: f.entry() for f in entries},
        input_dims={"image": image_dim, "text": text.dim, "labs": labs.token_dim},
        encoder_ids={
            "image": f"{cnn.model_id}+{vit.model_id}",
            "text": text.model_id,
            "labs": labs.model_id,
        },
    )
    torch.manual_seed(0)
    return FusionModel(config).eval()
