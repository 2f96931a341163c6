"""Fine-tuning the tiny image encoders on the training split's radiographs (the "option to
fine-tune" the encoders, done as a stage so the embeddings stay cacheable).

A randomly initialised tiny CNN or ViT carries little about the findings, and saliency (Grad-CAM)
can only point at lesions if the CNN learned them. So before fusion is trained, each backbone is
trained from its tiny random initialisation as a multi-label classifier (one logit per finding,
``problem_type="multi_label_classification"``) on the training split's images only, with early
stopping on the validation split's images. The saved checkpoint is the whole classifier: the
image encoder loads it with every key matched and embeds with its ``base_model``.

Where training images come with lesion masks (the synthetic cohort has them; at a hospital,
annotated sets such as segmented pneumothoraces or boxed consolidations), the CNN also learns
*where*: a localisation term asks that its class activation map -- the finding's head weights
applied at each position of the last feature map, which is what Grad-CAM of the head logit
computes -- put its mass inside the lesion. Trained on classification alone, three runs of the
same recipe pointed at the lesion in 35% (pneumothorax) to 82% (pneumonia) of test images on
average, and their heart failure maps often peaked in the effusion heart failure brings
(``docs/results/explain.md``): a classifier is free to learn any region that correlates with
the label. Only the training split's masks are used; validation and test masks stay for
scoring. The ViT has no such map (its head reads the CLS token), so it learns from labels only.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import (
    PreTrainedModel,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from mmcds.encoders.image import ImageEncoder
from mmcds.encoders.tiny import build_tiny_cnn, build_tiny_vit
from mmcds.fusion.train import masked_bce, set_seeds

log = logging.getLogger(__name__)

Kind = Literal["cnn", "vit"]


@dataclass
class PretrainSettings:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 8
    shift: int = 12  # random translation in pixels, so position is learned as anatomy, not grid
    # Optionally up-weight each finding's positives by its negative/positive ratio (capped). Off:
    # tried with a wider CNN (16-32-48-64) on the 1,000-patient cohort, it did not make the CNN
    # localise better (docs/results/explain.md) and it changes what early stopping watches.
    balance: bool = False
    max_pos_weight: float = 8.0
    # Cosine decay of the learning rate over ``epochs`` (then ``patience`` is not used: see the
    # loop). With a constant rate the tiny CNN's
    # validation loss jumped from epoch to epoch and early stopping picked a checkpoint by luck
    # (docs/results/explain.md: val loss 0.40 -> 0.25, pneumothorax image AUROC 0.75 -> 0.99).
    cosine: bool = True
    # Weight of the localisation term (module docstring) against the classification loss; it
    # applies to the CNN, on training images that have a mask. 0 trains on labels alone. Chosen
    # on the validation split over three seeds (docs/results/explain.md): at 0.1 the CNN both
    # localises and classifies better than on labels alone (validation loss 0.25 against 0.29);
    # at 0.3 and 1 it localises as well but classifies worse (0.31, 0.38).
    localise: float = 0.1
    seed: int = 0


@dataclass
class PretrainLog:
    kind: str
    epochs_run: int = 0
    best_epoch: int = 0
    best_val_loss: float = float("inf")
    localise: float = 0.0  # weight of the localisation term, 0 where it was not applied
    masked_images: int = 0  # training images with at least one lesion mask used for localisation
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def _classifier(kind: Kind, findings: Sequence[str], folder: Path) -> PreTrainedModel:
    """A classifier whose backbone config is the tiny encoder's built into ``folder``."""
    labels = {
        "id2label": dict(enumerate(findings)),
        "label2id": {f: i for i, f in enumerate(findings)},
    }
    if kind == "cnn":
        build_tiny_cnn(folder)
        cnn_cfg = ResNetConfig.from_pretrained(folder)
        cnn_cfg.update({"problem_type": "multi_label_classification", **labels})
        return ResNetForImageClassification(cnn_cfg)
    build_tiny_vit(folder)
    vit_cfg = ViTConfig.from_pretrained(folder)
    vit_cfg.update({"problem_type": "multi_label_classification", **labels})
    return ViTForImageClassification(vit_cfg)


def preprocess_all(encoder: ImageEncoder, pixels: Sequence[np.ndarray]) -> torch.Tensor:
    """The encoder's own preprocessing, so training sees exactly what service feeds it."""
    parts = [encoder.preprocess(pixels[i : i + 64]) for i in range(0, len(pixels), 64)]
    return torch.cat(parts) if parts else torch.zeros(0)


def _augment(
    x: torch.Tensor, masks: torch.Tensor | None, shift: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random translation (zero padded; masks moved with their images) and a mild
    contrast/brightness change per image."""
    n, _, h, w = x.shape
    if shift:
        dy, dx = torch.randint(0, 2 * shift + 1, (2,), generator=generator).tolist()
        x = F.pad(x, (shift, shift, shift, shift))[:, :, dy : dy + h, dx : dx + w]
        if masks is not None:
            masks = F.pad(masks, (shift, shift, shift, shift))[:, :, dy : dy + h, dx : dx + w]
    gain = 1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1)
    offset = 0.1 * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1)
    return x * gain + offset, masks


def mask_targets(
    masks: Sequence[Mapping[str, np.ndarray]], findings: Sequence[str], size: tuple[int, int]
) -> torch.Tensor:
    """(N, findings, H, W) uint8 coverage (0-255) at the model's input size, resized the way the
    processor resizes the image (bilinear, no crop); all zero where an image has no mask."""
    out = torch.zeros((len(masks), len(findings), *size), dtype=torch.uint8)
    for i, per_image in enumerate(masks):
        for k, finding in enumerate(findings):
            m = per_image.get(finding)
            if m is not None and m.any():
                img = Image.fromarray(np.where(m, 255, 0).astype(np.uint8), mode="L")
                resized = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                out[i, k] = torch.from_numpy(np.array(resized))
    return out


def localisation_loss(
    feature_map: torch.Tensor, head_weight: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """Mean over (image, finding) pairs with a mask of -log(share of the class activation map's
    softmax mass that falls on the lesion).

    The map is ``head_weight`` applied at every position of ``feature_map`` (B, C, h, w); the
    head's bias is the same everywhere and drops out of the softmax. A spatial softmax, not a
    per-position target: the head logit is the map's mean, so asking every lesion-free position
    to be low would fight the label of a small lesion, while the softmax only asks the lesion to
    hold the map's peak -- what the pointing game checks. Coverage is the mask's share of each
    feature-map cell, so a cell the lesion only grazes counts in proportion."""
    cam = torch.einsum("bchw,kc->bkhw", feature_map, head_weight).flatten(2)
    cover = F.adaptive_avg_pool2d(
        masks.float() / 255.0, (feature_map.shape[-2], feature_map.shape[-1])
    ).flatten(2)
    has = cover.sum(-1) > 0
    if not bool(has.any()):
        return feature_map.new_zeros(())
    inside = (cam.softmax(-1) * cover).sum(-1)
    return -inside[has].clamp_min(1e-6).log().mean()


def pretrain_image_encoder(
    kind: Kind,
    findings: Sequence[str],
    train_pixels: Sequence[np.ndarray],
    train_labels: np.ndarray,
    val_pixels: Sequence[np.ndarray],
    val_labels: np.ndarray,
    out: Path,
    settings: PretrainSettings | None = None,
    progress: bool = True,
    train_masks: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> PretrainLog:
    """Train ``kind`` on the given images and save the best (lowest validation classification
    loss) to ``out``. ``train_masks``, one mapping per training image (finding -> boolean lesion
    mask on the image's pixel grid, absent findings left out), turns on the CNN's localisation
    term (module docstring)."""
    s = settings or PretrainSettings()
    started = time.perf_counter()
    set_seeds(s.seed)
    with tempfile.TemporaryDirectory(prefix=f"mmcds-{kind}-") as tmp:
        model = _classifier(kind, findings, Path(tmp))
        encoder = ImageEncoder.from_pretrained(tmp)  # its processor, for identical inputs
        x_train = preprocess_all(encoder, train_pixels)
        x_val = preprocess_all(encoder, val_pixels)
        processor = encoder.processor
    if train_masks is not None and len(train_masks) != len(train_pixels):
        raise ValueError(
            f"train_masks has {len(train_masks)} entries for {len(train_pixels)} training images"
        )
    masks = None
    if kind == "cnn" and s.localise > 0 and train_masks is not None:
        masks = mask_targets(train_masks, findings, (x_train.shape[-2], x_train.shape[-1]))
    y_train = torch.from_numpy(np.asarray(train_labels, np.float32))
    y_val = torch.from_numpy(np.asarray(val_labels, np.float32))
    pos_weight = None
    if s.balance and len(y_train):
        pos = (y_train == 1).sum(dim=0).clamp(min=1.0)
        labelled = (y_train >= 0).sum(dim=0)  # an unknown label is neither class
        pos_weight = ((labelled - pos) / pos).clamp(1.0, s.max_pos_weight)
    generator = torch.Generator().manual_seed(s.seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=s.epochs) if s.cosine else None
    )
    record = PretrainLog(kind)
    if masks is not None:
        record.localise = s.localise
        record.masked_images = int(masks.flatten(1).any(dim=1).sum())
    best = copy.deepcopy(model.state_dict())
    bar = tqdm(range(s.epochs), desc=f"pretrain {kind}", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        losses, loc_losses = [], []
        for start in range(0, len(order), s.batch_size):
            idx = order[start : start + s.batch_size]
            x, m = _augment(x_train[idx], None if masks is None else masks[idx], s.shift, generator)
            logits, loc = _forward(model, x, m)
            loss = masked_bce(logits, y_train[idx], pos_weight=pos_weight)
            if loc is not None:
                loc_losses.append(loc.item())
                loss = loss + s.localise * loc
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())  # the whole objective; the localisation part is logged too
        if schedule is not None:
            schedule.step()
        val_loss = _loss(model, x_val, y_val, pos_weight)
        record.history.append(
            {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss}
            | ({"train_localisation": float(np.mean(loc_losses))} if loc_losses else {})
        )
        bar.set_postfix(train=f"{np.mean(losses):.3f}", val=f"{val_loss:.3f}")
        record.epochs_run = epoch + 1
        if val_loss < record.best_val_loss - 1e-4:
            record.best_val_loss, record.best_epoch = val_loss, epoch
            best = copy.deepcopy(model.state_dict())
        elif not s.cosine and epoch - record.best_epoch >= s.patience:
            # Under the cosine schedule every epoch runs: while the rate is still high the
            # validation loss jumps (0.47 -> 1.37 -> 0.55 in one run), and patience would stop
            # before the decay lets it settle; the best epoch is kept either way.
            break
    model.load_state_dict(best)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record.seconds = time.perf_counter() - started
    log.info(
        "%s pre-trained: best val loss %.4f at epoch %d",
        kind,
        record.best_val_loss,
        record.best_epoch,
    )
    return record


def _forward(
    model: PreTrainedModel, x: torch.Tensor, masks: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Head logits, and the localisation term when ``masks`` are given (CNN classifiers only:
    ResNetForImageClassification's head is Flatten then Linear on the pooled feature map)."""
    if masks is None:
        return model(pixel_values=x).logits, None
    out = model.base_model(pixel_values=x)
    head = cast(torch.nn.Sequential, model.classifier)[-1]
    assert isinstance(head, torch.nn.Linear)
    logits = head(out.pooler_output.flatten(1))
    return logits, localisation_loss(out.last_hidden_state, head.weight, masks)


@torch.inference_mode()
def _loss(
    model: PreTrainedModel, x: torch.Tensor, y: torch.Tensor, pos_weight: torch.Tensor | None
) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(x), 128):
        logits = model(pixel_values=x[start : start + 128]).logits
        total += float(masked_bce(logits, y[start : start + 128], pos_weight, reduction="sum"))
    return total / max(1, int((y >= 0).sum()))
