"""Image saliency: Grad-CAM gated by occlusion for the CNN, grad-weighted rollout for the ViT.

What each heatmap explains:

- CNN: the fine-tuned CNN's own classification logit for the finding (its checkpoint is the
  ``ResNetForImageClassification`` that ``fusion/pretrain.py`` trained on the training split's
  images and labels; the fusion model embeds with the same backbone). The fusion logit reaches
  the CNN only through one pooled vector, next to the ViT's and the other modalities, and its
  gradient localised worse (``docs/results/explain.md``). A CNN without a head for the finding
  (a plain backbone) falls back to the fusion logit. Grad-CAM (Selvaraju et al. 2017) on the
  chosen stage outputs (``CNN_STAGES``); the tiny and the usual CXR CNNs pool by global
  average, for which Grad-CAM on the last map equals HiResCAM (Draelos & Carin 2020). The CNN
  heatmap is the geometric mean of that Grad-CAM and the occlusion sensitivity of the same score
  (Zeiler & Fergus 2014: how much the score drops when a square of the input is hidden), both
  max-normalised: a region is hot only where the finding's features fire *and* hiding it lowers
  the score (squares hidden by a grey and by a dark fill, ``occluders``). Each alone failed in
  its own way on the synthetic lesion masks (validation split, ``docs/results/explain.md``):
  Grad-CAM of a pneumothorax peaks inside the collapsed lung, whose features carry the logit,
  while hiding the air rim is what lowers it; occlusion spreads over every square whose
  hiding moves the score, edges and anatomy included.
- ViT: the fusion logit, differentiated through the image token.

Both live on the model's input grid (after the checkpoint's resize and any crop), so each is
mapped back onto the image's review grid (``records.review_shape``: the original pixel grid, or
the image scaled to 1,024 px for larger ones; boxes are found there and reported in original
pixels) through the preprocessing geometry, probed once per image shape (``probe_geometry``)
rather than re-derived from each processor's options.

- ViT: gradient-weighted attention rollout (Chefer et al. 2021): per layer the positive part of
  gradient x attention, averaged over heads, accumulated as ``R <- R + A R`` from identity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from mmcds.encoders.image import FeatureMaps, ImageEncoder
from mmcds.fusion.model import FusionBatch, FusionModel
from mmcds.records import Box, ImageInput, ImageSaliency, rescale_box, review_shape

# What the CNN heatmap is: the default, or one of its two parts (for the benchmark's ablation).
CnnHeatmap = Literal["gradcam-occlusion", "gradcam", "occlusion"]
CNN_HEATMAPS: tuple[CnnHeatmap, ...] = get_args(CnnHeatmap)
CNN_METHOD = "gradcam-occlusion-cnn"
VIT_METHOD = "grad-rollout-vit"
BOX_THRESHOLD = 0.5  # a region is where the heatmap is at least half its maximum
MAX_BOXES = 3
CNN_STAGES = (-1,)  # ResNet stage outputs Grad-CAM uses (see image_saliency)
# Occlusion squares, as fractions of the model input's side (32 px at 224, moved by 16 px): about
# one lesion's width on the synthetic cohort, and half-overlapping so every region is hidden in
# four placements rather than cut by a grid line.
OCCLUSION_PATCH = 1 / 7
OCCLUSION_STRIDE = 1 / 14
OCCLUSION_BATCH = 64


@dataclass(frozen=True)
class Geometry:
    """Model input pixel (centre) ``u`` sees original pixel ``scale * u + offset``, per axis."""

    scale_y: float
    offset_y: float
    scale_x: float
    offset_x: float
    input_hw: tuple[int, int]


def _fit_axis(values: np.ndarray, length: int) -> tuple[float, float]:
    # values: the probe ramp read back along one axis of the model input, in [0, 1]
    src = values * length - 0.5  # ramp value (x + 0.5) / length -> original pixel index x
    n = len(src)
    core = slice(n // 10, n - n // 10)  # resampling clamps at the borders; fit the interior
    u = np.arange(n, dtype=np.float64)[core]
    scale, offset = np.polyfit(u, src[core], 1)
    return float(scale), float(offset)


def _probe(encoder: ImageEncoder, shape: tuple[int, int]) -> Geometry:
    h, w = shape
    ramp_x = np.broadcast_to(((np.arange(w) + 0.5) / w).astype(np.float32)[None, :], shape)
    ramp_y = np.broadcast_to(((np.arange(h) + 0.5) / h).astype(np.float32)[:, None], shape)
    out = encoder.preprocess([ramp_x, ramp_y])[:, 0].double().numpy()
    # The processor's mean/std normalisation, to undo: a flat image stays flat through any
    # resize and crop, so two small ones give it (two full-size ones cost seconds at 3,000 px).
    flat = encoder.preprocess([np.zeros((16, 16), np.float32), np.ones((16, 16), np.float32)])
    lo, hi = (float(v) for v in flat[:, 0].double().mean(dim=(1, 2)))  # channel 0; all alike
    ramp_x, ramp_y = (out[0] - lo) / (hi - lo), (out[1] - lo) / (hi - lo)
    sx, ox = _fit_axis(np.median(ramp_x, axis=0), w)
    sy, oy = _fit_axis(np.median(ramp_y, axis=1), h)
    return Geometry(sy, oy, sx, ox, (int(out.shape[1]), int(out.shape[2])))


_probe_cached = lru_cache(maxsize=64)(_probe)


def probe_geometry(encoder: ImageEncoder, shape: tuple[int, int]) -> Geometry:
    """How ``encoder.preprocess`` maps an image of ``shape`` onto the model's input grid."""
    return _probe_cached(encoder, (int(shape[0]), int(shape[1])))


def _axis_weights(
    n_out: int, length: int, n_low: int, scale: float, offset: float, n_in: int
) -> np.ndarray:
    """(n_out, n_low) bilinear weights, zero outside the map: a map of ``n_low`` cells covering
    the model input's ``n_in`` pixels, sampled at the centres of ``n_out`` cells covering the
    original ``length`` pixels along one axis (``Geometry``: original = scale * input + offset)."""
    orig = (np.arange(n_out) + 0.5) * (length / n_out) - 0.5  # cell centre, original pixels
    u = (orig - offset) / scale  # -> model input pixel
    pos = (u + 0.5) * (n_low / n_in) - 0.5  # -> map cell (align_corners=False)
    lo = np.floor(pos).astype(np.int64)
    frac = pos - lo
    weights = np.zeros((n_out, n_low))
    rows = np.arange(n_out)
    for idx, wt in ((lo, 1 - frac), (lo + 1, frac)):
        inside = (idx >= 0) & (idx < n_low)  # zero padding: what lies outside the map adds 0
        weights[rows[inside], idx[inside]] += wt[inside]
    return weights


def to_grid(
    low: torch.Tensor, geometry: Geometry, shape: tuple[int, int], grid: tuple[int, int]
) -> np.ndarray:
    """Resample a (h, w) map covering the model input onto ``grid``, a grid of cells covering
    the original image of ``shape`` (its review grid, or ``shape`` itself for the pixel grid).

    Bilinear on the low-resolution map, zero where the preprocessing cropped the image away:
    what ``grid_sample`` computes, done as two small matrix products because bilinear
    weights are separable (a 7.5-megapixel sampling grid took seconds to build)."""
    in_h, in_w = geometry.input_hw
    h, w = low.shape[-2:]
    wy = _axis_weights(grid[0], shape[0], h, geometry.scale_y, geometry.offset_y, in_h)
    wx = _axis_weights(grid[1], shape[1], w, geometry.scale_x, geometry.offset_x, in_w)
    return (wy @ low.detach().double().cpu().numpy() @ wx.T).astype(np.float32)


def normalise(heat: np.ndarray) -> np.ndarray:
    top = float(heat.max()) if heat.size else 0.0
    return (heat / top).astype(np.float32) if top > 0 else np.zeros_like(heat, np.float32)


def boxes_from_heatmap(
    heat: np.ndarray, threshold: float = BOX_THRESHOLD, top: int = MAX_BOXES
) -> list[Box]:
    """Boxes around the connected regions where ``heat >= threshold * max``, best peak first,
    in ``heat``'s pixels."""
    if heat.size == 0 or float(heat.max()) <= 0:
        return []
    inside = heat >= threshold * float(heat.max())
    labels, n = ndimage.label(inside)
    if n == 0:
        return []
    # each region's peak in one pass over its pixels (ndimage.maximum sorts the label image)
    peaks = np.zeros(n + 1, heat.dtype)
    np.maximum.at(peaks, labels[inside], heat[inside])
    slices = ndimage.find_objects(labels)
    order = np.argsort(-peaks[1:], kind="stable")[:top]
    boxes = []
    for i in order:
        sy, sx = slices[i]
        boxes.append(
            (int(sx.start), int(sy.start), int(sx.stop), int(sy.stop), float(peaks[i + 1]))
        )
    return boxes


def _gradcam(fmap: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    weights = grad.mean(dim=(-2, -1), keepdim=True)  # (n, C, 1, 1)
    return torch.relu((weights * fmap).sum(dim=1))  # (n, h, w)


def _rollout(
    attentions: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    grid: tuple[int, int],
    cls: bool,
) -> torch.Tensor:
    n_img, _, n_tok, _ = attentions[0].shape
    eye = torch.eye(n_tok).expand(n_img, n_tok, n_tok)
    rel = eye.clone()
    for att, g in zip(attentions, grads, strict=True):
        a = torch.relu(g * att).mean(dim=1)  # (n, N, N)
        rel = rel + torch.bmm(a, rel)
    # what the pooled embedding reads: the CLS row, or the mean of the patch rows
    row = rel[:, 0, 1:] if cls else rel[:, 1:, 1:].mean(dim=1)
    return row.reshape(n_img, *grid)


def _norm_maps(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Product of per-image max-normalised maps, each upsampled to the finest grid."""
    size = max((m.shape[-2:] for m in maps), key=lambda hw: hw[0] * hw[1])
    out = None
    for m in maps:
        up = F.interpolate(m[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
        top = up.flatten(1).max(dim=1).values.clamp(min=1e-12)[:, None, None]
        up = up / top
        out = up if out is None else out * up
    assert out is not None
    return out


def occluders(pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two fills that hide a square of a radiograph, per channel (C, 1, 1), in normalised
    input units.

    A lesion is either more lucent than what it replaces (air: a pneumothorax) or denser (a
    consolidation, fluid, an enlarged heart). Grey, the processor's mean (0 after
    normalisation), hides the first; the image's own dark level (each channel's 5th percentile:
    air and lung) hides the second. One grey occluder alone missed most consolidations and
    effusions on the validation split, a dark one alone all but one pneumothorax
    (``docs/results/explain.md``). Per channel, because a grey radiograph normalised with
    per-channel means and stds (ImageNet's) has a different value in each."""
    flat = pixel_values.detach().float().flatten(1)
    dark = torch.quantile(flat, 0.05, dim=1).to(pixel_values.dtype)[:, None, None]
    return torch.zeros_like(dark), dark


def occlusion_sensitivity(
    pixel_values: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """How much each score drops when a square of one image is hidden: (F, h, w) on the input grid.

    ``pixel_values`` (3, h, w) is one preprocessed image; ``score`` maps a batch of such images
    to (batch, F) scores. Each square is hidden once with each of the ``occluders`` and each
    pixel gets, per fill, the mean drop over the squares that hide it; the larger of the two
    fills' drops is kept. Rises (hiding made the finding more likely) count as 0, as in
    Grad-CAM's ReLU.
    """
    _, h, w = pixel_values.shape
    ph, pw = max(1, round(h * OCCLUSION_PATCH)), max(1, round(w * OCCLUSION_PATCH))
    sh, sw = max(1, round(h * OCCLUSION_STRIDE)), max(1, round(w * OCCLUSION_STRIDE))
    places = [(y, x) for y in range(0, h - ph + 1, sh) for x in range(0, w - pw + 1, sw)]
    fills = occluders(pixel_values)
    jobs = [(fill, y, x) for fill in fills for y, x in places]
    with torch.inference_mode():
        base = score(pixel_values[None])[0]
        drops = []
        for at in range(0, len(jobs), OCCLUSION_BATCH):
            chunk = jobs[at : at + OCCLUSION_BATCH]
            hidden = pixel_values.expand(len(chunk), -1, -1, -1).clone()
            for i, (fill, y, x) in enumerate(chunk):
                hidden[i, :, y : y + ph, x : x + pw] = fill
            drops.append(base[None] - score(hidden))
        drop = torch.cat(drops).float().cpu().reshape(len(fills), len(places), -1)
    count = torch.zeros(h, w)
    for y, x in places:
        count[y : y + ph, x : x + pw] += 1
    best = None
    for per_fill in drop:
        total = torch.zeros(per_fill.shape[1], h, w)
        for (y, x), d in zip(places, per_fill, strict=True):
            total[:, y : y + ph, x : x + pw] += d[:, None, None]
        mean = total / count.clamp(min=1)
        best = mean if best is None else torch.maximum(best, mean)
    assert best is not None
    return torch.relu(best)


def _occlusion_score(
    cnn: ImageEncoder,
    fusion: FusionModel,
    batch: FusionBatch,
    vit_embedding: torch.Tensor,
    slot: int,
    targets: Sequence[tuple[str, int]],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The scores the CNN heatmaps explain, as a function of the CNN's input for one image:
    per target ``("head", i)`` the CNN's own logit ``i``, ``("fusion", f)`` the fusion logit ``f``
    with this image's token (``slot``) rebuilt from the CNN embedding of that input."""

    def score(pixel_values: torch.Tensor) -> torch.Tensor:
        n = len(pixel_values)
        pooled = cnn.embed_float32(pixel_values).to(cnn.device)
        by_kind: dict[str, torch.Tensor] = {}
        if cnn.head is not None:
            by_kind["head"] = cnn.head(pooled.to(cnn.dtype))
        if any(kind == "fusion" for kind, _ in targets):
            tokens = {m: t.expand(n, -1, -1).clone() for m, t in batch.tokens.items()}
            vit = vit_embedding.expand(n, -1).to(tokens["image"].dtype)
            tokens["image"][:, slot] = torch.cat([pooled.to(vit.dtype), vit], dim=1)
            masks = {m: k.expand(n, -1) for m, k in batch.mask.items()}
            lexical = None if batch.lexical is None else batch.lexical.expand(n, -1)
            by_kind["fusion"] = fusion(FusionBatch(tokens, masks, lexical))
        return torch.stack([by_kind[kind][:, i].float() for kind, i in targets], dim=1)

    return score


def _cnn_heatmap(
    kind: CnnHeatmap,
    cam: torch.Tensor,
    occluded: torch.Tensor | None,
    j: int,
    geometry: Geometry,
    shape: tuple[int, int],
    grid: tuple[int, int],
) -> np.ndarray:
    """The CNN heatmap on ``grid``: Grad-CAM, occlusion (target ``j``), or both."""
    if kind == "gradcam":
        return normalise(to_grid(cam, geometry, shape, grid))
    assert occluded is not None
    occlusion = normalise(to_grid(occluded[j], geometry, shape, grid))
    if kind == "occlusion":
        return occlusion
    grad_cam = normalise(to_grid(cam, geometry, shape, grid))
    return normalise(np.sqrt(grad_cam * occlusion))


def cnn_target(cnn: ImageEncoder, finding: str) -> str:
    """What the CNN heatmap for ``finding`` explains: ``"head"`` (the fine-tuned CNN's own
    logit for that finding) when the checkpoint has a classification head naming it, otherwise
    ``"fusion"`` (the fusion model's logit through the image token)."""
    return "head" if cnn.head is not None and finding in cnn.labels else "fusion"


def image_saliency(
    cnn: ImageEncoder,
    vit: ImageEncoder,
    fusion: FusionModel,
    batch: FusionBatch,
    images: Sequence[ImageInput],
    findings: Sequence[int] | None = None,
    cnn_stages: Sequence[int] = CNN_STAGES,
    cnn_heatmap: CnnHeatmap = "gradcam-occlusion",
) -> list[ImageSaliency]:
    """Heatmaps for every image and finding, recomputed here with the graph kept.

    ViT: the fusion logit differentiated through the image tokens of ``batch`` (a one-patient
    batch whose first ``len(images)`` image tokens are these images, in order). CNN: Grad-CAM of
    the score ``cnn_target`` names, gated by that score's ``occlusion_sensitivity`` (module
    docstring) -- the fine-tuned CNN's own classification logit for the
    finding when it has one, because the fusion logit reaches the CNN only through one pooled
    vector mixed with the ViT's and the other modalities, and its gradient localised worse
    (``docs/results/explain.md``). ``cnn_stages`` picks the ResNet stage outputs used (-1 the
    last, 14x14 at 224 for the 3-stage tiny CNN; -2 the one before, 28x28); several are
    multiplied after normalising, so a region must light up at both resolutions.
    ``cnn_heatmap`` keeps only one part of the CNN heatmap (method ``"<part>-cnn"``): Grad-CAM or
    occlusion alone, for comparisons; the default is their geometric mean."""
    cap = fusion.config.max_tokens["image"]
    images = list(images)[:cap]  # the fusion model never sees images beyond its cap
    if not images:
        return []
    names = fusion.config.findings
    wanted = list(range(len(names))) if findings is None else list(findings)
    pixels = [im.pixels for im in images]
    cmaps: FeatureMaps = cnn.feature_maps(pixels, grad=True)
    vmaps: FeatureMaps = vit.feature_maps(pixels, grad=True)
    assert cmaps.feature_map is not None and vmaps.attentions is not None and vmaps.grid
    live = torch.cat([cmaps.embedding.float(), vmaps.embedding.float()], dim=1)
    tokens = dict(batch.tokens)
    image_tokens = tokens["image"].clone()
    image_tokens[0, : len(images)] = live
    tokens["image"] = image_tokens
    fusion.eval()
    assert cmaps.stage_maps is not None
    stages = [cmaps.stage_maps[k] for k in cnn_stages]
    with torch.enable_grad():
        logits = fusion(FusionBatch(tokens, batch.mask, batch.lexical))[0]
        scores = []
        for f in wanted:
            if cnn_target(cnn, names[f]) == "head":
                assert cmaps.head_logits is not None
                # each image's logit depends on that image only: the sum's gradient is per image
                head = cmaps.head_logits[:, cnn.labels.index(names[f])].sum()
                scores.append((head, logits[f]))
            else:
                scores.append((logits[f], logits[f]))
        grads_by_finding = []
        for i, (cnn_score, fusion_score) in enumerate(scores):
            keep = i < len(wanted) - 1
            g_cnn = torch.autograd.grad(cnn_score, stages, retain_graph=True)
            g_vit = torch.autograd.grad(fusion_score, vmaps.attentions, retain_graph=keep)
            grads_by_finding.append((*g_cnn, *g_vit))
    fmaps = [m.detach().float() for m in stages]
    atts = [a.detach().float() for a in vmaps.attentions]
    geo_c = [probe_geometry(cnn, im.pixels.shape[:2]) for im in images]
    geo_v = [probe_geometry(vit, im.pixels.shape[:2]) for im in images]
    targets = [
        ("head", cnn.labels.index(names[f]))
        if cnn_target(cnn, names[f]) == "head"
        else ("fusion", f)
        for f in wanted
    ]
    # the fusion batch the Grad-CAM pass saw, every image token from the live encoders
    live_batch = FusionBatch({m: t.detach() for m, t in tokens.items()}, batch.mask, batch.lexical)
    pixel_values = cmaps.pixel_values.detach()
    vit_embedding = vmaps.embedding.detach().float()
    occluded = [
        occlusion_sensitivity(
            pixel_values[k], _occlusion_score(cnn, fusion, live_batch, vit_embedding[k], k, targets)
        )
        if cnn_heatmap != "gradcam"
        else None
        for k in range(len(images))
    ]
    out: list[ImageSaliency] = []
    for j, (f, grads) in enumerate(zip(wanted, grads_by_finding, strict=True)):
        n_s = len(fmaps)
        cams = [_gradcam(m, g.float()) for m, g in zip(fmaps, grads[:n_s], strict=True)]
        cam = cams[0] if n_s == 1 else _norm_maps(cams)
        roll = _rollout(atts, [g.float() for g in grads[n_s:]], vmaps.grid, vit.pooling == "cls")
        for k, im in enumerate(images):
            shape = (int(im.pixels.shape[0]), int(im.pixels.shape[1]))
            grid = review_shape(shape)
            for method, heat in (
                (
                    f"{cnn_heatmap}-cnn",
                    _cnn_heatmap(cnn_heatmap, cam[k], occluded[k], j, geo_c[k], shape, grid),
                ),
                (VIT_METHOD, normalise(to_grid(roll[k], geo_v[k], shape, grid))),
            ):
                # boxes found on the review grid, reported in original pixels
                boxes = [rescale_box(b, grid, shape) for b in boxes_from_heatmap(heat)]
                out.append(ImageSaliency(im.sop_uid, names[f], method, heat, boxes, None, shape))
    return out
