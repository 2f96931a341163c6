"""Unknown labels (`mmcds label --uncertain ignore`) are masked, never read as negatives; few
positives warn."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from mmcds.fusion.calibrate import fit_one
from mmcds.fusion.data import UNKNOWN, few_positive_warnings
from mmcds.fusion.metrics import auroc, binary_metrics, ece
from mmcds.fusion.train import masked_bce


def test_masked_label_adds_no_loss_and_no_gradient() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0], [-2.0, 0.0]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0], [0.0, UNKNOWN], [0.0, 1.0]])
    loss = masked_bce(logits, labels)
    loss.backward()
    assert logits.grad is not None
    assert logits.grad[1, 1] == 0  # the unknown label pulls its logit nowhere
    assert (logits.grad.flatten()[[0, 1, 2, 4, 5]] != 0).all()  # the patient's other label teaches
    known = torch.tensor([True, True, True, False, True, True])
    expected = F.binary_cross_entropy_with_logits(
        logits.detach().flatten()[known], labels.flatten()[known]
    )
    assert torch.isclose(loss, expected)


def test_with_every_label_known_it_is_plain_bce() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 4, generator=g)
    labels = (torch.rand(16, 4, generator=g) > 0.5).float()
    weight = torch.tensor([1.0, 2.0, 3.0, 1.5])
    assert torch.isclose(
        masked_bce(logits, labels, weight),
        F.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight),
    )


def test_figures_leave_unknown_labels_out() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0.01, 0.99)
    # 20 more patients with an unknown label whom the model scores high: read as negatives they
    # would pull the AUROC down and shift the calibrator; masked they change nothing
    y_more = np.concatenate([y, np.full(20, UNKNOWN)])
    p_more = np.concatenate([p, np.full(20, 0.99)])
    assert auroc(y_more, p_more) == auroc(y, p)
    assert auroc(np.where(y_more < 0, 0, y_more), p_more) < auroc(y, p)  # what masking avoids
    assert ece(y_more, p_more) == ece(y, p)
    m = binary_metrics(y_more, p_more, {"warning": 0.5})
    assert (m["n"], m["positives"]) == (200, int(y.sum()))
    assert m["operating_points"]["warning"]["flagged"] == int((p >= 0.5).sum())
    z, z_more = np.log(p / (1 - p)), np.log(p_more / (1 - p_more))
    assert fit_one(z_more, y_more) == fit_one(z, y)


def test_few_positives_warn_below_thirty_only() -> None:
    few = few_positive_warnings({"pneumonia": 30, "pneumothorax": 29}, {"pneumothorax": 6})
    assert list(few) == ["pneumothorax"]
    assert "only 29 positive patients in training (6 in validation" in few["pneumothorax"]
