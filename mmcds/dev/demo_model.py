"""The demo's model: trained once at first run on a synthetic cohort, then reused."""

from __future__ import annotations

from pathlib import Path

from mmcds.fusion.model import FusionConfig, is_current
from mmcds.fusion.pretrain import PretrainSettings
from mmcds.fusion.train import TrainSettings
from mmcds.settings import Settings
from mmcds.synth import generate_cohort
from mmcds.training.run import Echo, TrainOptions, train_cohort

#: The demo's model: trained once at first run, then reused from ``settings.model_dir``.
DEMO_PATIENTS = 600
DEMO_SEED = 2024


def demo_model_dir(settings: Settings) -> Path:
    return Path(settings.model_dir) / "fusion-demo"


def ensure_demo_model(settings: Settings, echo: Echo = print) -> Path:
    """The demo's trained model folder; trained here at first run (a few minutes on 2 cores).

    The same as ``mmcds synth --out DIR --patients 600 --seed 2024`` then
    ``mmcds train --data DIR --out <model_dir>/fusion-demo --seed 2024 --pretrain-epochs 10``.
    """
    out = demo_model_dir(settings)
    if is_current(out) and (out / "lab_encoder.json").is_file() and _validated(out):
        return out  # a demo model from an older mmcds (another architecture) is retrained
    cohort = Path(settings.model_dir) / "demo-cohort"
    echo(f"first run: training the demo model on {DEMO_PATIENTS} synthetic patients -> {out}")
    generate_cohort(cohort, patients=DEMO_PATIENTS, seed=DEMO_SEED)
    options = TrainOptions(
        seed=DEMO_SEED,
        pretrain_settings=PretrainSettings(epochs=10, seed=DEMO_SEED),
        train_settings=TrainSettings(seed=DEMO_SEED),
    )
    train_cohort(cohort, out, settings, options, echo=echo)
    return out


def _validated(folder: Path) -> bool:
    """Whether the model carries per-subset validation (older demo models do not)."""
    return bool(FusionConfig.load(folder).subsets)
