"""Overlays sized for review, and bundles measured against the receiving server's limits."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mmcds.explain.overlay import LEGEND_W, overlay_png, review_grey
from mmcds.fhir.bundle_limits import (
    OMITTED_PREFIX,
    BundleLimits,
    BundleTooLarge,
    fit_bundle,
    oversize,
    review_png,
)
from mmcds.records import ImageSaliency, review_shape


def _noisy_png(w: int, h: int) -> bytes:
    rgb = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_overlay_of_a_full_size_radiograph_is_composed_at_review_size() -> None:
    rows, cols = 3000, 2500
    pixels = np.random.default_rng(1).random((rows, cols), dtype=np.float32)
    grid = review_shape((rows, cols))
    assert grid == (1024, round(cols * 1024 / rows))
    heat = np.zeros(grid, np.float32)  # heatmaps live on the review grid, boxes in original px
    heat[341:683, 171:512] = 1.0
    saliency = ImageSaliency(
        "1.2", "x", "m", heat, [(500, 1000, 1500, 2000, 1.0)], None, (rows, cols)
    )
    grey = review_grey(pixels)
    assert grey.shape == grid and grey.dtype == np.uint8
    png = overlay_png(grey, saliency, "test")
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (grid[1] + LEGEND_W, 1024)
        rgb = np.asarray(im.convert("RGB"))
    # The hot square is where it was, scaled: coloured inside, grey well outside.
    y, x = int(1500 * 1024 / rows), int(1000 * 1024 / rows)
    assert len(set(rgb[y, x])) > 1 and len(set(rgb[100, 100])) == 1
    # the box is drawn at the scaled place: its top-left corner is box colour (cyan)
    assert tuple(rgb[round(1000 * 1024 / rows) + 1, round(500 * 1024 / rows) + 1]) == (0, 255, 255)
    with pytest.raises(ValueError, match="not on the image's grid"):
        overlay_png(review_grey(pixels[:1500]), saliency, "test")


def test_review_png_shrinks_and_fits_one_string() -> None:
    limits = BundleLimits(max_string_bytes=400_000, overlay_max_side=512)
    big = _noisy_png(1500, 1200)
    small = review_png(big, limits)
    with Image.open(io.BytesIO(small)) as im:
        assert max(im.size) == 512
    assert len(base64.b64encode(small)) <= limits.max_string_bytes
    fitting = _noisy_png(100, 80)
    assert review_png(fitting, limits) is fitting  # already fine: not re-encoded


def _bundle(data: str) -> dict[str, Any]:
    report = {
        "resourceType": "DiagnosticReport",
        "status": "preliminary",
        "code": {"text": "x"},
        "conclusion": "Findings.",
        "media": [{"link": {"reference": "urn:uuid:m"}}],
    }
    binary = {"resourceType": "Binary", "contentType": "image/png", "data": data}
    media = {"resourceType": "Media", "status": "completed", "content": {"url": "urn:uuid:b"}}
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": r} for r in (binary, media, report)],
    }


def test_a_bundle_over_the_limits_goes_without_its_overlays_and_says_so() -> None:
    limits = BundleLimits(max_bundle_bytes=50_000, max_string_bytes=10_000)
    fits = _bundle("A" * 1000)
    assert fit_bundle(fits, limits) is fits
    long_string = _bundle("A" * 20_000)
    assert "Binary.data" in (oversize(long_string, limits) or "")
    fitted = fit_bundle(long_string, limits)
    types = [e["resource"]["resourceType"] for e in fitted["entry"]]
    assert types == ["DiagnosticReport"]
    report = fitted["entry"][0]["resource"]
    assert "media" not in report and OMITTED_PREFIX in report["conclusion"]
    assert "Binary.data of 20000 bytes" in report["conclusion"]
    assert long_string["entry"][0]["resource"]["resourceType"] == "Binary"  # input untouched


def test_a_report_too_large_even_without_overlays_is_a_clear_error() -> None:
    limits = BundleLimits(max_string_bytes=10_000)
    bundle = _bundle("A" * 100)
    bundle["entry"][2]["resource"]["conclusion"] = "x" * 20_000
    with pytest.raises(BundleTooLarge, match="DiagnosticReport.conclusion"):
        fit_bundle(bundle, limits)
