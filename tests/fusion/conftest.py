"""Shared fusion fixtures."""

from __future__ import annotations

import pytest
from planted import planted, tiny_config

from mmcds.fusion.data import EncodedSet
from mmcds.fusion.model import FusionModel
from mmcds.fusion.train import TrainSettings, train_fusion


@pytest.fixture(scope="session")
def trained() -> tuple[FusionModel, EncodedSet, EncodedSet]:
    train, val, test = planted(300, 1), planted(120, 2), planted(200, 3)
    model, log = train_fusion(
        tiny_config(), train, val, TrainSettings(epochs=15, patience=4, seed=0), progress=False
    )
    assert log.best_val_loss < log.history[0]["val_loss"]
    return model, val, test
