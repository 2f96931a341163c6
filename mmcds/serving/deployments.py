"""The models as Ray Serve deployments (``build_app``): one per image encoder, the text
encoder, the fusion model (the application's ingress) and the explainer.

The encoders do the heavy work, so their calls are batched (``@serve.batch``): images and note
chunks from concurrent hooks or cohort workers meet in one forward pass. Each deployment
autoscales between 1 and ``ray_max_replicas`` replicas on its queue, and takes a GPU per replica
where the cluster has GPUs (``ray_gpus``). The explainer holds a full pipeline: saliency
back-propagates through the image encoders, so it cannot run on embeddings alone.

Replicas load their checkpoints from the same settings the service would (the same folders
must be visible to every node: a shared volume or the image's baked models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from mmcds.encoders.image import ImageEncoder
from mmcds.encoders.labs import LabEncoder
from mmcds.encoders.text import Chunk, TextEncoder
from mmcds.explain.stage import explain
from mmcds.fusion.gate import assess
from mmcds.fusion.model import FusionModel
from mmcds.fusion.ood import OodDetector
from mmcds.fusion.pipeline import Pipeline, image_model_paths
from mmcds.records import Analysis, Assessment, Encodings, Explanation, Note, PatientRecord
from mmcds.settings import Settings

# Batches wait at most a few ms to fill: a hook's budget is ~500 ms and the encoders are fast.
MAX_BATCH = 16
BATCH_WAIT_S = 0.005

AssessRequest = tuple[Encodings, str | None, PatientRecord | None]


class ImageEmbedder:
    def __init__(self, path: str, settings: Settings) -> None:
        torch.set_num_threads(settings.torch_threads)
        self.encoder = ImageEncoder.from_pretrained(path, backend=settings.image_backend)

    def describe(self) -> dict[str, Any]:
        return {"model_id": self.encoder.model_id, "dim": self.encoder.dim}

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def embed(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.encoder.embed(images))


class TextEmbedder:
    def __init__(self, settings: Settings) -> None:
        torch.set_num_threads(settings.torch_threads)
        self.encoder = TextEncoder.from_pretrained(settings.text_model or None)

    def describe(self) -> dict[str, Any]:
        return {"model_id": self.encoder.model_id, "dim": self.encoder.dim}

    async def chunks(self, notes: list[Note]) -> list[Chunk]:
        # async: on the replica's event loop, like the batched embed, never beside it. A sync
        # method would run in a thread while embed runs, and a fast tokenizer is not
        # thread-safe (padding set by one call is lost to the other: seen in a cohort run).
        return self.encoder.chunks(notes)

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def embed(self, chunks: list[Chunk]) -> list[np.ndarray]:
        return list(self.encoder.embed_chunks(chunks, batch_size=MAX_BATCH))


def _fusion_parts(settings: Settings) -> tuple[FusionModel, LabEncoder, OodDetector | None]:
    if settings.fusion_model:
        folder = Path(settings.fusion_model)
        return (
            FusionModel.from_pretrained(folder),
            LabEncoder.from_pretrained(folder),
            OodDetector.load(folder),
        )
    # An untrained fusion model is wired to the encoders' widths: build it as the service does.
    pipeline = Pipeline.from_settings(settings)
    return pipeline.fusion, pipeline.labs, pipeline.ood


class Fusion:
    """The ingress: the fusion model and the gate, and the handles of the other deployments."""

    def __init__(
        self,
        settings: Settings,
        cnn: DeploymentHandle,
        vit: DeploymentHandle,
        text: DeploymentHandle,
        explainer: DeploymentHandle,
    ) -> None:
        torch.set_num_threads(settings.torch_threads)
        self.fusion, self.labs, self.ood = _fusion_parts(settings)
        self.handles = {"cnn": cnn, "vit": vit, "text": text, "explainer": explainer}

    async def describe(self) -> dict[str, Any]:
        """What a client needs to run the cheap stages itself: the fusion model (for its
        config and model card), the lab encoder (a pandas transform), the encoders' ids."""
        info: dict[str, Any] = {"fusion": self.fusion, "labs": self.labs}
        for name in ("cnn", "vit", "text"):
            info[name] = await self.handles[name].describe.remote()
        return info

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def assess(self, requests: list[AssessRequest]) -> list[Assessment]:
        # Per patient: each one's subset of inputs selects its own calibration (fusion.gate).
        # The model is small; the batch saves the round trips, not the arithmetic.
        return [assess(self.fusion, enc, site, rec, self.ood) for enc, site, rec in requests]


class Explainer:
    def __init__(self, settings: Settings) -> None:
        torch.set_num_threads(settings.torch_threads)
        self.pipeline = Pipeline.from_settings(settings)

    async def explain(self, analysis: Analysis) -> Explanation:
        # One explanation at a time per replica (the same models, hooks and gradients).
        return explain(self.pipeline, analysis)


def build_app(settings: Settings, gpus: float = 0.0) -> Application:
    """The application: ``gpus`` per encoder/explainer replica (0 on CPU-only clusters)."""
    scaling = {
        "min_replicas": 1,
        "max_replicas": max(1, settings.ray_max_replicas),
        "target_ongoing_requests": 4,
    }
    model = {"num_cpus": settings.ray_cpus, "num_gpus": gpus}
    light = {"num_cpus": settings.ray_cpus}
    cnn_path, vit_path = image_model_paths(settings)

    def deployment(cls: type, name: str, actor: dict[str, float]) -> Any:
        return serve.deployment(cls, name=name, autoscaling_config=scaling, ray_actor_options=actor)

    cnn = deployment(ImageEmbedder, "cnn", model).bind(cnn_path, settings)
    vit = deployment(ImageEmbedder, "vit", model).bind(vit_path, settings)
    text = deployment(TextEmbedder, "text", model).bind(settings)
    explainer = deployment(Explainer, "explainer", model).bind(settings)
    fusion = deployment(Fusion, "fusion", light)
    app: Application = fusion.bind(settings, cnn, vit, text, explainer)
    return app
