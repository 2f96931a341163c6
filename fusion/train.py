"""Training the fusion model: modality dropout, early stopping on validation loss, seeds.

Encoders are frozen here (their embeddings come from the cache); the image encoders' optional
fine-tuning is a separate stage before this one (``mmcds.fusion.pretrain``), so embeddings stay
cacheable.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from mmcds.fusion.data import EncodedSet
from mmcds.fusion.lexical import LexicalPath
from mmcds.fusion.model import FusionBatch, FusionConfig, FusionModel, batch_from_encodings
from mmcds.records import MODALITIES, Encodings

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    epochs: int = 80
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    patience: int = 10  # epochs without a better validation loss before stopping
    seed: int = 0


@dataclass
class TrainLog:
    epochs_run: int = 0
    best_epoch: int = 0
    best_val_loss: float = float("inf")
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def masked_bce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary cross-entropy over the known labels only: a label below 0 (uncertain, kept out by
    ``--uncertain ignore``) adds nothing to the loss or its gradient, and the patient's other
    findings still teach. With every label known this is ``binary_cross_entropy_with_logits``.
    ``reduction``: "mean" over known labels, or "sum"."""
    keep = labels >= 0
    each = F.binary_cross_entropy_with_logits(
        logits, labels.clamp(min=0), pos_weight=pos_weight, reduction="none"
    )
    total = (each * keep).sum()
    return total if reduction == "sum" else total / keep.sum().clamp(min=1)


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def take(batch: FusionBatch, index: torch.Tensor) -> FusionBatch:
    return FusionBatch(
        {m: t[index] for m, t in batch.tokens.items()},
        {m: k[index] for m, k in batch.mask.items()},
        None if batch.lexical is None else batch.lexical[index],
    )


def modality_drop(
    mask: dict[str, torch.Tensor], p: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Drop each present modality with chance ``p``, never all of a patient's modalities."""
    present = torch.stack([mask[m].any(dim=1) for m in MODALITIES], dim=1)
    drop = (torch.rand(present.shape, generator=generator) < p) & present
    nothing_left = (present & ~drop).sum(dim=1) == 0
    drop[nothing_left] = False
    return {m: drop[:, i] for i, m in enumerate(MODALITIES)}


def without(batch: FusionBatch, removed: Sequence[str]) -> FusionBatch:
    """The batch with whole modalities masked out, as if they had never arrived."""
    mask = {m: (torch.zeros_like(k) if m in removed else k) for m, k in batch.mask.items()}
    return FusionBatch(batch.tokens, mask, batch.lexical)  # masked text masks the lexical path


@torch.inference_mode()
def predict_logits(
    model: FusionModel,
    items: Sequence[Encodings],
    removed: Sequence[str] = (),
    batch_size: int = 256,
) -> np.ndarray:
    """Uncalibrated logits (N, F); ``removed`` modalities are masked for every patient."""
    model.eval()
    out = []
    for start in range(0, len(items), batch_size):
        batch = batch_from_encodings(model.config, list(items[start : start + batch_size]))
        out.append(model(without(batch, removed)).cpu().numpy())
    if not out:
        return np.zeros((0, len(model.config.findings)), np.float32)
    return np.concatenate(out).astype(np.float64)


def train_fusion(
    config: FusionConfig,
    train: EncodedSet,
    val: EncodedSet,
    settings: TrainSettings | None = None,
    progress: bool = True,
    lexical: LexicalPath | None = None,
) -> tuple[FusionModel, TrainLog]:
    """Train from scratch; returns the weights of the epoch with the lowest validation loss.
    With ``lexical`` (and ``config.lexical``), the text encodings carry its logits: out-of-fold
    ones for ``train``."""
    s = settings or TrainSettings()
    if len(train) == 0 or len(val) == 0:
        raise ValueError("training needs patients in both the train and the validation split")
    set_seeds(s.seed)
    started = time.perf_counter()
    model = FusionModel(config, lexical)
    generator = torch.Generator().manual_seed(s.seed)
    tb = batch_from_encodings(config, train.encodings)
    vb = batch_from_encodings(config, val.encodings)
    y_train = torch.from_numpy(train.labels.astype(np.float32))
    y_val = torch.from_numpy(val.labels.astype(np.float32))
    optimiser = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    record = TrainLog()
    best_state = copy.deepcopy(model.state_dict())
    bar = tqdm(range(s.epochs), desc="fusion", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(train), generator=generator)
        losses = []
        for start in range(0, len(train), s.batch_size):
            idx = order[start : start + s.batch_size]
            batch = take(tb, idx)
            drop = modality_drop(batch.mask, config.modality_dropout, generator)
            loss = masked_bce(model(batch, drop=drop), y_train[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        model.eval()
        with torch.inference_mode():
            val_loss = float(masked_bce(model(vb), y_val))
        train_loss = float(np.mean(losses))
        record.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
        record.epochs_run = epoch + 1
        if val_loss < record.best_val_loss - 1e-4:
            record.best_val_loss, record.best_epoch = val_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - record.best_epoch >= s.patience:
            log.info("early stop at epoch %d (best %d)", epoch, record.best_epoch)
            break
    model.load_state_dict(best_state)
    model.eval()
    record.seconds = time.perf_counter() - started
    log.info(
        "fusion trained: %d epochs, best val loss %.4f at epoch %d, %.1f s",
        record.epochs_run,
        record.best_val_loss,
        record.best_epoch,
        record.seconds,
    )
    return model, record
