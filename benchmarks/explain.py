"""Explanation benchmark: latency per patient, localisation against the synthetic lesion masks,
and the weight-randomisation sanity check. Prints JSON (and writes it with --out).

    .venv/bin/python benchmarks/explain.py --model MODEL_DIR --data COHORT [--limit 60]

MODEL_DIR is a folder written by ``mmcds train`` (fusion checkpoint + ``cnn/`` + ``vit/``); only
its test-split patients are scored when it was trained on COHORT (``--split val``: its
validation patients, to choose between variants without looking at the test split). Without
--model the tiny untrained models are used (mechanics only: their figures mean nothing).
Without --data a cohort is generated (--patients, --seed).

- pointing game: the heatmap's maximum lies inside the true lesion mask (strict: no tolerance
  margin), over positive patients whose image has a mask for the finding;
- peak distance: how far the heatmap's maximum lies from the nearest mask pixel, in % of the
  image width (0 for a hit; images differ in size between sites, so not in pixels): a miss by
  the width of a pleural line and a miss into the other lung score the same in the pointing
  game, not here;
- box IoU: the top derived box against the bounding box of the mask;
- peak in another finding: the share of maps whose maximum misses their own mask but lies inside
  the mask of another finding the same patient has (a heart failure map peaking in the
  effusion): the model's evidence for one finding read off another;
- ablation (``--ablation``): the same figures for each part of the CNN heatmap alone (Grad-CAM,
  occlusion), on the same images in the same run;
- ``--cnn DIR``: another CNN checkpoint (e.g. ``mmcds train --pretrain-seed 1``'s ``cnn/``, or
  one pre-trained alone) replaces the model's, scored on the model's split. The CNN heatmaps
  explain the CNN's own head logits, so their figures hold; the fusion model's outputs, and
  with them the ViT maps, do not (it was trained on the other CNN's embeddings);
- randomisation: Spearman rank correlation between a heatmap and the same heatmap after the
  backbone's weights are re-drawn at random (low = the method depends on the weights).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy import ndimage
from scipy.stats import spearmanr

from mmcds.encoders.image import ImageEncoder
from mmcds.encoders.labs import LabEncoder
from mmcds.encoders.text import TextEncoder
from mmcds.explain.image import (
    CNN_HEATMAPS,
    CNN_METHOD,
    CNN_STAGES,
    VIT_METHOD,
    cnn_target,
    image_saliency,
)
from mmcds.explain.stage import explain
from mmcds.fusion.model import FusionModel, batch_from_encodings
from mmcds.fusion.pipeline import Pipeline
from mmcds.records import ImageSaliency
from mmcds.settings import Settings
from mmcds.store import EmbeddingCache
from mmcds.training.dataset import Example, iter_examples


def load_pipeline(model: Path | None, cache: str | None, threads: int) -> Pipeline:
    if model is None:
        root = Path(tempfile.mkdtemp())
        p = Pipeline.from_settings(
            Settings(model_dir=root, database_url=f"sqlite:///{root / 'c.db'}")
        )
    else:
        # the service's CPU backends; ONNX Runtime on as many threads as torch, when set
        cnn = ImageEncoder.from_pretrained(
            str(model / "cnn"), backend="auto", onnx_threads=threads or None
        )
        vit = ImageEncoder.from_pretrained(
            str(model / "vit"), backend="auto", onnx_threads=threads or None
        )
        fusion = FusionModel.from_pretrained(model)
        p = Pipeline(
            cnn, vit, TextEncoder.from_pretrained(None), LabEncoder.from_pretrained(model), fusion
        )
    p.cache = EmbeddingCache(cache) if cache else None
    return p


def split_keys(model: Path | None, part: str = "test") -> set[str]:
    if model is None:
        return set()
    config = json.loads((model / "config.json").read_text())
    split = config.get("training", {}).get("split") or config.get("extra", {}).get("split") or {}
    return set(split.get(part, []))


def box_iou(box: tuple[int, int, int, int], mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    tx0, ty0, tx1, ty1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    x0, y0, x1, y1 = box
    iw, ih = max(0, min(x1, tx1) - max(x0, tx0)), max(0, min(y1, ty1) - max(y0, ty0))
    inter = iw * ih
    union = (x1 - x0) * (y1 - y0) + (tx1 - tx0) * (ty1 - ty0) - inter
    return float(inter / union) if union else 0.0


Scores = dict[str, dict[str, dict[str, list[float]]]]  # figure -> method -> finding -> values


def score_maps(maps: list[ImageSaliency], ex: Example, scores: Scores) -> None:
    """Pointing, peak distance and box IoU of each map whose finding ``ex`` has, with a mask."""
    for s in maps:
        path = ex.masks.get(f"{s.sop_uid}:{s.finding}")
        if path is None or ex.labels.get(s.finding) != 1:  # -1: unknown, not a positive
            continue
        mask = np.asarray(Image.open(path)) > 0
        if not mask.any():
            continue
        y, x = s.peak()  # original pixels, as the mask is (heatmaps live on the review grid)
        hit = float(mask[y, x]) if s.heatmap.max() > 0 else 0.0
        off = float(ndimage.distance_transform_edt(~mask)[y, x]) / mask.shape[1]
        iou = box_iou(s.boxes[0][:4], mask) if s.boxes else 0.0
        other = 0.0
        if not hit and s.heatmap.max() > 0:
            for f, has in ex.labels.items():
                p = ex.masks.get(f"{s.sop_uid}:{f}")
                if has and f != s.finding and p is not None and np.asarray(Image.open(p))[y, x]:
                    other = 1.0
                    break
        for figure, value in (
            ("pointing", hit),
            ("distance", 100.0 * off),
            ("iou", iou),
            ("other", other),
        ):
            scores[figure].setdefault(s.method, {}).setdefault(s.finding, []).append(value)


def summarise(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {"n": 0}
    return {
        "n": int(arr.size),
        "mean": round(float(arr.mean()), 4),
        "median": round(float(np.median(arr)), 4),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--limit", type=int, default=60, help="at most this many patients")
    ap.add_argument(
        "--split", choices=("test", "val"), default="test", help="the model's split to score"
    )
    ap.add_argument(
        "--random-images", type=int, default=12, help="images for the randomisation check"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--cache", help="embedding cache URL (speeds up re-runs)")
    ap.add_argument(
        "--cnn-target",
        choices=("auto", "fusion"),
        default="auto",
        help="auto: the CNN's own head logit where it has one; fusion: the fusion logit",
    )
    ap.add_argument(
        "--cnn", type=Path, help="score this CNN checkpoint's heatmaps instead of the model's"
    )
    ap.add_argument(
        "--ablation",
        action="store_true",
        help="also score Grad-CAM and occlusion alone (the parts of the CNN heatmap)",
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data
    if data is None:
        from mmcds.synth import generate_cohort

        data = Path(tempfile.mkdtemp()) / "cohort"
        generate_cohort(data, patients=args.patients, seed=args.seed)
    pipe = load_pipeline(args.model, args.cache, args.threads)
    if args.cnn is not None:
        pipe.cnn = ImageEncoder.from_pretrained(
            str(args.cnn), backend="auto", onnx_threads=args.threads or None
        )
        # the fusion model rightly refuses embeddings from a CNN it was not trained on; here
        # only the CNN's own heatmaps are scored (module docstring), so let them through
        pipe.fusion.config.encoder_ids.pop("image", None)
    if args.cnn_target == "fusion":
        pipe.cnn.head = None  # explain_image then differentiates the fusion logit
    keys = split_keys(args.model, args.split)
    labelled = set(pd.read_csv(data / "labels.csv", dtype={"patient_key": str})["patient_key"])
    # a model trained on this cohort is scored on its test split; on another cohort, on all
    wanted = keys if keys & labelled else labelled
    examples: list[Example] = []
    for ex in iter_examples(data):
        if ex.key in wanted:
            examples.append(ex)
        if len(examples) >= args.limit:
            break
    latency: list[float] = []
    parts: dict[str, list[float]] = {}
    scores: Scores = {"pointing": {}, "distance": {}, "iou": {}, "other": {}}
    ablation = [h for h in CNN_HEATMAPS if f"{h}-cnn" != CNN_METHOD] if args.ablation else []
    rand_pairs: list[tuple[Any, Any]] = []
    explain(pipe, pipe.analyse(examples[0].record))  # warm-up: first-call costs are not per patient
    for ex in examples:
        analysis = pipe.analyse(ex.record)
        start = time.perf_counter()
        exp = explain(pipe, analysis)
        latency.append(time.perf_counter() - start)
        for k, v in exp.seconds.items():
            parts.setdefault(k, []).append(v)
        score_maps(exp.images, ex, scores)
        if ablation and analysis.record.images:
            batch = batch_from_encodings(pipe.fusion.config, [analysis.encodings])
            for part in ablation:
                maps = image_saliency(
                    pipe.cnn, pipe.vit, pipe.fusion, batch, analysis.record.images, cnn_heatmap=part
                )
                score_maps([m for m in maps if m.method != VIT_METHOD], ex, scores)
        if len(rand_pairs) < args.random_images and ex.record.images:
            rand_pairs.append((analysis, exp))
    rho: dict[str, list[float]] = {CNN_METHOD: [], VIT_METHOD: []}
    r_cnn, r_vit = pipe.cnn.randomised(1), pipe.vit.randomised(2)
    for analysis, exp in rand_pairs:
        batch = batch_from_encodings(pipe.fusion.config, [analysis.encodings])
        before = {(s.sop_uid, s.finding, s.method): s.heatmap for s in exp.images}
        for enc_cnn, enc_vit, method in (
            (r_cnn, pipe.vit, CNN_METHOD),
            (pipe.cnn, r_vit, VIT_METHOD),
        ):
            for s in image_saliency(enc_cnn, enc_vit, pipe.fusion, batch, analysis.record.images):
                if s.method == method:
                    r = spearmanr(
                        before[(s.sop_uid, s.finding, s.method)].ravel(), s.heatmap.ravel()
                    )[0]
                    rho[method].append(0.0 if np.isnan(r) else float(r))
    lat = np.asarray(latency)
    result = {
        "model": str(args.model) if args.model else "untrained tiny models",
        "cnn": str(args.cnn) if args.cnn else "the model's",
        "trained": pipe.fusion.config.trained,
        "data": str(data),
        "split": args.split if keys & labelled else "all (not the model's cohort)",
        "patients": len(examples),
        "torch_threads": torch.get_num_threads(),
        "explain_latency_s": {
            "p50": round(float(np.percentile(lat, 50)), 3),
            "p95": round(float(np.percentile(lat, 95)), 3),
            "max": round(float(lat.max()), 3),
            "parts_p50": {k: round(float(np.median(v)), 3) for k, v in parts.items()},
        },
        "cnn_explains": {f: cnn_target(pipe.cnn, f) for f in pipe.fusion.config.findings},
        "cnn_stages": list(CNN_STAGES),
        **{
            name: {m: {f: summarise(v) for f, v in by.items()} for m, by in scores[key].items()}
            for name, key in (
                ("pointing_game", "pointing"),
                ("peak_distance_pct_width", "distance"),
                ("box_iou", "iou"),
                ("peak_in_other_finding", "other"),
            )
        },
        "randomisation_spearman": {m: summarise(v) for m, v in rho.items()},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
