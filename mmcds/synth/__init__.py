"""Synthetic multimodal cohort whose ground truth is known (see ``cohort`` for the layout)."""

from mmcds.synth.cohort import GENERATOR_VERSION, CohortSummary, generate_cohort

__all__ = ["GENERATOR_VERSION", "CohortSummary", "generate_cohort"]
