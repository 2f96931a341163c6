"""The client side of the Ray backend: a ``Pipeline`` whose encoders and fusion step are calls
to the Ray Serve deployments (``mmcds.serving.deployments``). The cheap steps stay in the
caller (embedding cache lookups, chunk bookkeeping, the lab features), so a cached input never
crosses the network.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from mmcds.encoders.image import ImageEncoder
from mmcds.encoders.text import Chunk, TextEncoder
from mmcds.errors import ConfigurationError
from mmcds.fusion.pipeline import Pipeline
from mmcds.records import Analysis, Assessment, Encodings, Explanation, Note, PatientRecord
from mmcds.serving.deployments import build_app
from mmcds.settings import Settings
from mmcds.store import EmbeddingCache

log = logging.getLogger(__name__)

APP = "mmcds-models"


class _Remote:
    """A deployment behind the encoder calls the pipeline makes: only ``model_id``, ``dim`` and
    the embedding calls are used, so there is no local model (no ``super().__init__``)."""

    def __init__(self, handle: DeploymentHandle, info: dict[str, Any]) -> None:
        self.handle = handle
        self.model_id = str(info["model_id"])
        self._dim = int(info["dim"])

    @property
    def dim(self) -> int:
        return self._dim

    def _each(self, items: Sequence[Any]) -> np.ndarray:
        # One call per input: the deployment batches them with other callers' inputs.
        calls = [self.handle.embed.remote(item) for item in items]
        if not calls:
            return np.zeros((0, self._dim), np.float32)
        return np.stack([c.result() for c in calls]).astype(np.float32)


class RemoteImageEncoder(_Remote, ImageEncoder):
    def embed(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        return self._each(pixels)


class RemoteTextEncoder(_Remote, TextEncoder):
    def chunks(self, notes: Sequence[Note]) -> list[Chunk]:
        return list(self.handle.chunks.remote(list(notes)).result())

    def embed_chunks(self, chunks: Sequence[Chunk], batch_size: int = 16) -> np.ndarray:
        return self._each(chunks)


class RemotePipeline(Pipeline):
    def __init__(self, settings: Settings, app: str = APP) -> None:
        self._fusion_handle = serve.get_deployment_handle("fusion", app_name=app)
        self._explainer = serve.get_deployment_handle("explainer", app_name=app)
        info = self._fusion_handle.describe.remote().result()
        super().__init__(
            cnn=RemoteImageEncoder(serve.get_deployment_handle("cnn", app_name=app), info["cnn"]),
            vit=RemoteImageEncoder(serve.get_deployment_handle("vit", app_name=app), info["vit"]),
            text=RemoteTextEncoder(serve.get_deployment_handle("text", app_name=app), info["text"]),
            labs=info["labs"],
            fusion=info["fusion"],  # for its config and card; fusing runs in the deployment
            cache=EmbeddingCache(settings.database_url),
        )

    def fuse(
        self, encodings: Encodings, site: str | None = None, record: PatientRecord | None = None
    ) -> Assessment:
        result: Assessment = self._fusion_handle.assess.remote((encodings, site, record)).result()
        return result

    def explain_remotely(self, analysis: Analysis) -> Explanation:
        result: Explanation = self._explainer.explain.remote(analysis).result()
        return result


def init_ray(settings: Settings, **kwargs: Any) -> None:
    """Join the cluster at ``ray_address``, or start a local Ray instance when it is empty."""
    if ray.is_initialized():
        return
    if not settings.ray_address:
        # A local instance declares at least 8 logical CPUs: Ray's CPUs are scheduling tokens,
        # and five deployments plus the cohort workers must fit on a 2-core machine too (the
        # OS shares the real cores). A cluster declares its own resources.
        kwargs.setdefault("num_cpus", max(8, os.cpu_count() or 1))
        kwargs.setdefault("include_dashboard", False)
    ray.init(address=settings.ray_address or None, log_to_driver=False, **kwargs)


def deploy(settings: Settings) -> None:
    """Deploy (or update) the models application on the Ray cluster."""
    init_ray(settings)
    gpus = settings.ray_gpus
    if gpus is None:  # auto: one GPU per model replica where the cluster has any
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    serve.start(proxy_location="Disabled")  # callers use handles; no HTTP ingress needed
    serve.run(build_app(settings, gpus=gpus), name=APP, route_prefix=None)


def models_status() -> str | None:
    """Readiness of the models on the Ray cluster this process joined: None when the
    application is RUNNING, else why not (deploying, unhealthy, not deployed)."""
    app = serve.status().applications.get(APP)
    if app is None:
        return "models not deployed on Ray Serve"
    if app.status == "RUNNING":
        return None
    return f"Ray Serve application {getattr(app.status, 'value', app.status)}"


def connect(settings: Settings, *, deploy_if_missing: bool = True) -> RemotePipeline:
    init_ray(settings)
    try:
        serve.get_app_handle(APP)
    except Exception as exc:  # Ray says "not found" with a bare exception type
        if not deploy_if_missing:
            raise ConfigurationError(
                f"no Ray Serve application {APP!r} on the cluster; run `mmcds serve-models`"
            ) from exc
        log.info("deploying the models application %s on Ray", APP)
        deploy(settings)
    return RemotePipeline(settings)
