"""Fixtures shared by the explanation tests: the tiny local models and a small cohort."""

from __future__ import annotations

import pytest

from mmcds.fusion.pipeline import Pipeline
from mmcds.settings import Settings
from mmcds.synth import generate_cohort
from mmcds.training.dataset import Example, iter_examples


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    root = tmp_path_factory.mktemp("models")
    settings = Settings(model_dir=root, database_url=f"sqlite:///{root / 'cache.db'}")
    p = Pipeline.from_settings(settings)
    p.cache = None  # the deletion test re-encodes edited notes; keep runs independent
    return p


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> list[Example]:
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, patients=3, seed=5)
    return list(iter_examples(out))
