"""The explain stage: an ``Analysis`` -> an ``Explanation`` (saliency, evidence, contributions,
summary), computed once per analysis and stored with it (``mmcds.service.analysis_store``).

Everything is measured against the same fusion model that produced the assessment, on the
same encodings: no second classifier is explained in its place.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

import pandas as pd

from mmcds.encoders.labs import empty_lab_frame
from mmcds.explain.attribution import lab_shapley, modality_shapley
from mmcds.explain.image import image_saliency
from mmcds.explain.overlay import overlay_png, review_grey
from mmcds.explain.summary import summary_html, summary_line, summary_markdown
from mmcds.explain.text import evidence_spans
from mmcds.findings import display
from mmcds.fusion.model import FusionBatch, batch_from_encodings
from mmcds.fusion.pipeline import Pipeline
from mmcds.records import (
    Analysis,
    Explanation,
    ImageSaliency,
    LabContribution,
    ModalityShapley,
)

T = TypeVar("T")


def _timed(seconds: dict[str, float], name: str, fn: Callable[[], T]) -> T:
    start = time.perf_counter()
    try:
        return fn()
    finally:
        seconds[name] = round(time.perf_counter() - start, 4)


def _float(value: object) -> float | None:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _time(value: object) -> datetime | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, datetime):
        return value
    return pd.Timestamp(str(value)).to_pydatetime()


def explain_modalities(pipeline: Pipeline, batch: FusionBatch) -> list[ModalityShapley]:
    values, base, full = modality_shapley(pipeline.fusion, batch)
    return [
        ModalityShapley(
            finding=name,
            values={m: float(v[f]) for m, v in values.items()},
            base=float(base[f]),
            full=float(full[f]),
        )
        for f, name in enumerate(pipeline.fusion.config.findings)
    ]


def explain_labs(
    pipeline: Pipeline, analysis: Analysis, batch: FusionBatch
) -> list[LabContribution]:
    enc = analysis.encodings.by_modality.get("labs")
    if enc is None:
        return []
    feats = pipeline.labs.features(analysis.record.labs)
    cap = pipeline.fusion.config.max_tokens["labs"]
    names = list(enc.spans)[:cap]
    measured = [i for i, name in enumerate(names) if feats.latest.get(name) is not None]
    absent_tokens = pipeline.labs.encode(empty_lab_frame()).tokens
    phi, _, _ = lab_shapley(pipeline.fusion, batch, absent_tokens, measured)
    share = {pos: phi[j] for j, pos in enumerate(measured)}
    out = []
    for f, finding in enumerate(pipeline.fusion.config.findings):
        for i, name in enumerate(names):
            latest = feats.latest.get(name)
            out.append(
                LabContribution(
                    finding=finding,
                    lab=name,
                    value=_float(latest.value) if latest else None,
                    unit=latest.unit if latest else None,
                    time=_time(latest.time) if latest else None,
                    ref_low=_float(latest.ref_low) if latest else None,
                    ref_high=_float(latest.ref_high) if latest else None,
                    contribution=float(share[i][f]) if i in share else 0.0,
                    interpretation=(latest.interpretation or None) if latest else None,
                )
            )
    return out


def explain_images(
    pipeline: Pipeline, analysis: Analysis, batch: FusionBatch, overlays: bool
) -> list[ImageSaliency]:
    if "image" not in analysis.encodings.by_modality:
        return []
    images = analysis.record.images
    maps = image_saliency(pipeline.cnn, pipeline.vit, pipeline.fusion, batch, images)
    if overlays:
        # Only the overlays the report carries: the review page draws every map (the ViT's
        # too) from its heatmap, and composing the 4 unread ViT PNGs took ~0.3 s of a
        # full-size analysis.
        reported = [s for s in maps if s.in_report]
        shown = {s.sop_uid for s in reported}  # images past the model's cap have no maps
        grey = {im.sop_uid: review_grey(im.pixels) for im in images if im.sop_uid in shown}
        for s in reported:
            s.overlay_png = overlay_png(grey[s.sop_uid], s, f"{display(s.finding)} - {s.method}")
    return maps


def explain(pipeline: Pipeline, analysis: Analysis, *, overlays: bool = True) -> Explanation:
    """Explain every finding of ``analysis`` with the pipeline's own models."""
    fusion = pipeline.fusion
    batch = batch_from_encodings(fusion.config, [analysis.encodings])
    seconds: dict[str, float] = {}
    out = Explanation(analysis_id=analysis.identifier, seconds=seconds)
    start = time.perf_counter()
    out.modalities = _timed(seconds, "modalities", lambda: explain_modalities(pipeline, batch))
    out.labs = _timed(seconds, "labs", lambda: explain_labs(pipeline, analysis, batch))
    out.images = _timed(
        seconds, "images", lambda: explain_images(pipeline, analysis, batch, overlays)
    )
    text = analysis.encodings.by_modality.get("text")
    if text is not None:
        out.evidence = _timed(
            seconds,
            "text",
            lambda: evidence_spans(pipeline.text, fusion, batch, analysis.record.notes, text.spans),
        )
    out.summary_line = summary_line(analysis)
    out.summary_markdown = summary_markdown(analysis, out)
    out.summary_html = summary_html(analysis, out)
    seconds["total"] = round(time.perf_counter() - start, 4)
    return out
