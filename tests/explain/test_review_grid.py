"""Heatmaps of full-size radiographs live on the review grid (``records.review_shape``); boxes and
peaks come back in original pixels, and mean what they meant on the full pixel grid."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmcds.explain.image import (
    CNN_METHOD,
    VIT_METHOD,
    Geometry,
    boxes_from_heatmap,
    probe_geometry,
    to_grid,
)
from mmcds.explain.stage import explain_images
from mmcds.fusion.model import batch_from_encodings
from mmcds.fusion.pipeline import Pipeline
from mmcds.records import ImageSaliency, rescale_box, review_shape
from mmcds.training.dataset import Example

FULL = (3000, 2500)


def _grid_sample_reference(low: torch.Tensor, g: Geometry, shape: tuple[int, int]) -> np.ndarray:
    """The pixel-grid resampling as it was done before (``grid_sample`` over every pixel)."""
    in_h, in_w = g.input_hw
    ys = (np.arange(shape[0]) - g.offset_y) / g.scale_y
    xs = (np.arange(shape[1]) - g.offset_x) / g.scale_x
    gy = torch.from_numpy(2 * (ys + 0.5) / in_h - 1).float()
    gx = torch.from_numpy(2 * (xs + 0.5) / in_w - 1).float()
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
    out = F.grid_sample(low[None, None], grid, mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def test_review_shape_and_box_round_trip() -> None:
    assert review_shape((300, 280)) == (300, 280)  # small images keep their own grid
    assert review_shape((1024, 700)) == (1024, 700)
    assert review_shape(FULL) == (1024, 853)
    assert review_shape((2500, 3000)) == (853, 1024)
    grid = review_shape(FULL)
    for box in [(0, 0, 853, 1024, 1.0), (17, 400, 18, 401, 0.5), (300, 12, 611, 900, 0.2)]:
        big = rescale_box(box, grid, FULL)
        assert 0 <= big[0] < big[2] <= FULL[1] and 0 <= big[1] < big[3] <= FULL[0]
        assert rescale_box(big, FULL, grid) == box


def test_peak_is_reported_in_original_pixels() -> None:
    grid = review_shape(FULL)
    heat = np.zeros(grid, np.float32)
    heat[700, 200] = 1.0
    s = ImageSaliency("1", "f", "m", heat, [], None, FULL)
    y, x = s.peak()
    # inside the original pixels that review cell (700, 200) covers
    assert 700 * FULL[0] / grid[0] <= y < 701 * FULL[0] / grid[0]
    assert 200 * FULL[1] / grid[1] <= x < 201 * FULL[1] / grid[1]
    # an analysis stored before the review grid: heatmap on the original grid
    old = ImageSaliency("1", "f", "m", np.eye(50, dtype=np.float32), [])
    assert old.original_shape == (50, 50) and old.peak() == (0, 0)


@pytest.mark.parametrize("encoder", ["cnn", "vit"])
def test_review_grid_resampling_matches_the_pixel_grid(pipeline: Pipeline, encoder: str) -> None:
    """On the pixel grid ``to_grid`` is what ``grid_sample`` gave; on the review grid it is the
    same map, sampled at the review cells' centres: the same peak (to a cell) and boxes."""
    enc = pipeline.cnn if encoder == "cnn" else pipeline.vit
    geometry = probe_geometry(enc, FULL)
    assert geometry.scale_y == pytest.approx(FULL[0] / 224, rel=0.01)
    yy, xx = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    low = torch.exp(-((yy - 4.3) ** 2 + (xx - 9.6) ** 2) / 3.0) + 0.6 * torch.exp(
        -((yy - 10.0) ** 2 + (xx - 3.0) ** 2) / 2.0
    )
    full = to_grid(low, geometry, FULL, FULL)
    np.testing.assert_allclose(full, _grid_sample_reference(low, geometry, FULL), atol=1e-5)
    grid = review_shape(FULL)
    review = to_grid(low, geometry, FULL, grid)
    assert review.shape == grid
    cell = FULL[0] / grid[0]
    s_full = ImageSaliency("1", "f", "m", full, [], None, FULL)
    s_review = ImageSaliency("1", "f", "m", review, [], None, FULL)
    assert np.abs(np.subtract(s_full.peak(), s_review.peak())).max() <= cell
    boxes_full = boxes_from_heatmap(full)
    boxes_review = [rescale_box(b, grid, FULL) for b in boxes_from_heatmap(review)]
    assert len(boxes_full) == len(boxes_review) == 2
    for a, b in zip(boxes_full, boxes_review, strict=True):
        assert np.abs(np.subtract(a[:4], b[:4])).max() <= 2 * cell
        assert a[4] == pytest.approx(b[4], abs=0.01)


def test_full_size_radiograph_is_explained_on_its_review_grid(
    pipeline: Pipeline, examples: list[Example]
) -> None:
    """A 3,000 x 2,500 radiograph: every map on the 1,024 px grid, boxes inside the original
    image, overlays at review size; and the explanation is that of the same image at its own
    size: the CNN map of the enlarged image peaks where the original's does."""
    record = examples[0].record
    small = record.images[0]
    big_pixels = np.asarray(
        Image.fromarray(small.pixels, "F").resize(FULL[::-1], Image.Resampling.BILINEAR)
    ).clip(0, 1)
    big = dataclasses.replace(small, pixels=big_pixels, content_hash="")
    grid = review_shape(FULL)
    for im in (small, big):
        analysis = pipeline.analyse(dataclasses.replace(record, images=[im]))
        batch = batch_from_encodings(pipeline.fusion.config, [analysis.encodings])
        maps = explain_images(pipeline, analysis, batch, overlays=True)
        assert {s.method for s in maps} == {CNN_METHOD, VIT_METHOD}
        if im is small:
            before = {(s.finding, s.method): s for s in maps}
            continue
        for s in maps:
            assert s.heatmap.shape == grid and s.original_shape == FULL
            assert s.boxes
            for x0, y0, x1, y1, _ in s.boxes:
                assert 0 <= x0 < x1 <= FULL[1] and 0 <= y0 < y1 <= FULL[0]
            assert (s.overlay_png is not None) == (s.method == CNN_METHOD)
            # the map's peak, in original pixels, lies in its top box, in original pixels
            py, px = s.peak()
            x0, y0, x1, y1, _ = s.boxes[0]
            assert x0 <= px < x1 and y0 <= py < y1
            # the same place in the image as at its own size, in fractions of it (5% of the side)
            ref = before[(s.finding, s.method)]
            ry, rx = ref.peak()
            assert abs(py / FULL[0] - ry / small.pixels.shape[0]) < 0.05, (s.finding, s.method)
            assert abs(px / FULL[1] - rx / small.pixels.shape[1]) < 0.05, (s.finding, s.method)
