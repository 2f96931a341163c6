"""The review page's images, rendered on request from what the analysis stored: the radiograph
through a window/level preset, and each heatmap as a transparent colour layer on the same grid
(so the page toggles layers and sets their opacity without re-encoding the image).

A projection radiograph has no Hounsfield scale, so the CT windows named "lung" and
"mediastinum" cannot be fixed numbers here: each preset is a window between two percentiles of
the image's own (already VOI-transformed) pixel values. "Lung" spreads the dark end (aerated
lung, vessels, a pneumothorax's edge), "mediastinum" the dense end (heart border, spine,
effusion, tubes and lines).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mmcds.explain.overlay import SHOW_FROM, colour_map

PRESETS: dict[str, tuple[float, float]] = {
    "default": (1.0, 99.0),
    "lung": (1.0, 70.0),
    "mediastinum": (45.0, 99.7),
}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # speed over size: served on a LAN
    return buf.getvalue()


def windowed_png(pixels_png: bytes, preset: str) -> bytes:
    """The stored 16-bit image through ``preset`` as 8-bit grey PNG, full resolution."""
    low_pct, high_pct = PRESETS[preset]
    pixels = np.asarray(Image.open(io.BytesIO(pixels_png)), dtype=np.float32)
    lo, hi = np.percentile(pixels[:: max(1, pixels.shape[0] // 512)], [low_pct, high_pct])
    scaled = (pixels - lo) / (hi - lo) if hi > lo else np.zeros_like(pixels)
    return _png(Image.fromarray((np.clip(scaled, 0, 1) * 255).astype(np.uint8), "L"))


def heatmap_png(heatmap: np.ndarray) -> bytes:
    """RGBA: the overlay's colour map, alpha rising with the heatmap, clear below
    ``SHOW_FROM`` (the same rule as the report's overlay PNG)."""
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0, 1)
    rgb = colour_map(heat)
    alpha = np.where(heat >= SHOW_FROM, 90 + 165 * heat, 0).astype(np.uint8)
    return _png(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
