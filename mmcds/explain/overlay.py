"""Saliency overlays as PNG: the windowed image, a colour map where the heatmap is high, the
derived boxes, and a legend that says what the colours mean (Pillow only)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmcds.records import ImageSaliency, rescale_box, review_shape

# A perceptually ordered map (dark purple -> orange -> yellow, like "inferno"), so more colour
# reads as more evidence in grey-scale prints too; rainbow maps invent edges that are not there.
_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32
)
SHOW_FROM = 0.2  # below this fraction of the maximum the image is left uncoloured
LEGEND_W = 56
#: Bytes an overlay PNG may take: what one FHIR string of 1 MB (Medplum's limit, the default
#: ``MMCDS_WRITEBACK_MAX_STRING_BYTES``) holds in base64, less room for the attachment's JSON.
PNG_BUDGET = 1_000_000 * 3 // 4 - 64


def _interpolate_anchors(values: np.ndarray) -> np.ndarray:
    pos = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    rgb = _ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac
    return rgb.astype(np.uint8)


# The map at 1,024 levels, looked up rather than interpolated per pixel (a tenth of the time on
# a review-size overlay; steps of 0.1% of the range do not show).
_LEVELS = 1024
_TABLE = _interpolate_anchors(np.linspace(0, 1, _LEVELS))


def colour_map(values: np.ndarray) -> np.ndarray:
    """(…,) in [0, 1] -> (…, 3) uint8."""
    index = np.rint(np.clip(np.nan_to_num(values), 0, 1) * (_LEVELS - 1)).astype(np.intp)
    return _TABLE[index]


def window(pixels: np.ndarray) -> np.ndarray:
    """Grey uint8 from [0, 1] pixels, stretched between the 1st and 99th percentiles."""
    lo, hi = np.percentile(pixels, [1, 99])
    scaled = (pixels - lo) / (hi - lo) if hi > lo else np.zeros_like(pixels)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def review_grey(pixels: np.ndarray) -> np.ndarray:
    """The image on its review grid (``records.review_shape``: at most ``REVIEW_MAX_SIDE`` px a
    side), windowed to grey uint8: the base of every overlay of that image, made once per image.
    Overlays are for review on a screen: a 3,000 px radiograph composed at full size took ~5 s
    and 20 MB of PNG per map (and no FHIR server takes that inline)."""
    grid = review_shape(pixels.shape[:2])
    arr = np.asarray(pixels, dtype=np.float32)
    if grid != arr.shape[:2]:
        img = Image.fromarray(arr, "F")
        size = (grid[1], grid[0])
        arr = np.asarray(img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
    return window(arr)


def fit_png(canvas: Image.Image, budget: int) -> bytes:
    """PNG sized from ``budget`` up front: RGB when even incompressible pixels fit it (a filter
    byte per row, zlib's worst case adds ~0.1%), else 256 colours (fast octree). Encoding RGB,
    finding it over the budget and quantising then took ~0.6 s per review-size overlay; the
    palette PNG takes ~0.03 s and ~0.2 MB for a 1,024 px overlay (RGB: ~0.13 s, ~0.9 MB)."""
    w, h = canvas.size
    fits = (3 * w + 1) * h * 1.01 + 4096 <= budget
    image = canvas if fits else canvas.quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    buf = io.BytesIO()
    # zlib level 3: 2.5x faster than the default 6 at 1,024 px for ~7% more bytes
    image.save(buf, format="PNG", compress_level=3)
    # A palette PNG of an unusually busy map can still exceed the budget: the report bundle's
    # limits then leave the overlays out and say so in the report (fhir.bundle_limits).
    return buf.getvalue()


def overlay_png(
    grey: np.ndarray,
    saliency: ImageSaliency,
    title: str,
    alpha: float = 0.5,
    budget: int = PNG_BUDGET,
) -> bytes:
    """PNG bytes: ``grey`` (the image's ``review_grey``) + the saliency's colour map (alpha
    scaled by the heatmap) + its boxes + a legend, on the heatmap's (review) grid, encoded for
    ``budget`` bytes the first time (``fit_png``)."""
    heatmap = saliency.heatmap
    if grey.shape[:2] != heatmap.shape:
        raise ValueError(f"heatmap {heatmap.shape} is not on the image's grid {grey.shape[:2]}")
    h, w = heatmap.shape
    boxes = [rescale_box(b, saliency.original_shape, (h, w)) for b in saliency.boxes]
    base = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    heat = np.clip(heatmap, 0, 1)
    a = np.where(heat >= SHOW_FROM, alpha * heat, 0.0)[..., None]
    mixed = (base * (1 - a) + colour_map(heat).astype(np.float32) * a).astype(np.uint8)
    canvas = Image.new("RGB", (w + LEGEND_W, max(h, 120)), (255, 255, 255))
    canvas.paste(Image.fromarray(mixed, "RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for rank, (x0, y0, x1, y1, _score) in enumerate(boxes):
        colour = (0, 255, 255) if rank == 0 else (0, 160, 255)
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=2)
    # legend: a vertical bar from high (top) to low, labelled
    bar_h = max(40, min(h, canvas.height) - 60)
    ramp = np.linspace(1, 0, bar_h)[:, None].repeat(14, axis=1)
    canvas.paste(Image.fromarray(colour_map(ramp), "RGB"), (w + 8, 24))
    draw.text((w + 4, 4), "high", fill=(0, 0, 0), font=font)
    draw.text((w + 4, 28 + bar_h), "low", fill=(0, 0, 0), font=font)
    draw.text((4, 4), title, fill=(255, 255, 0), font=font)
    return fit_png(canvas, budget)
