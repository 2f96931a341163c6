"""Where the models run: ``MMCDS_MODEL_BACKEND=local`` (in this process) or ``ray``.

The analysis path does not change with the backend: it gets a ``Pipeline`` either way; with
``ray`` it is a ``RemotePipeline`` (``mmcds.serving.remote``) whose encoders and fusion step
call the Ray Serve deployments. Ray is an optional dependency (``pip install mmcds[ray]``):
it is imported only when the ray backend is chosen.

    pipeline = load_pipeline(settings)          # local or remote, as configured
    analysis = pipeline.analyse(record)
    explanation = explain_analysis(pipeline, analysis)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from mmcds.explain.stage import explain
from mmcds.fusion.pipeline import Pipeline
from mmcds.records import Analysis, Explanation
from mmcds.settings import Settings


@runtime_checkable
class ExplainsRemotely(Protocol):
    """A pipeline whose models live elsewhere explains there too (saliency needs them)."""

    def explain_remotely(self, analysis: Analysis) -> Explanation: ...


def load_pipeline(settings: Settings) -> Pipeline:
    """The configured backend's pipeline (``MMCDS_MODEL_BACKEND``)."""
    if settings.model_backend == "ray":
        from mmcds.serving.remote import connect  # Ray only where it is asked for

        return connect(settings)
    return Pipeline.from_settings(settings)


def is_remote(pipeline: Pipeline) -> bool:
    """Whether the pipeline's models run elsewhere (and explain there)."""
    return isinstance(pipeline, ExplainsRemotely)


def explain_analysis(pipeline: Pipeline, analysis: Analysis) -> Explanation:
    """Explain where the models are: in the explainer deployment for a remote pipeline."""
    if isinstance(pipeline, ExplainsRemotely):  # is_remote, narrowed for the type checker
        return pipeline.explain_remotely(analysis)
    return explain(pipeline, analysis)
