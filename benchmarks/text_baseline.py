"""The text path against TF-IDF + logistic regression on a notes-only cohort, same split, same run.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/text_baseline.py \\
        [--patients 400] [--seed 7] [--work /tmp/text-baseline] [--train-seed S] [--fresh N]
        [--no-lexical]

Writes a synthetic cohort (``mmcds synth``), keeps its notes only
(``mmcds.synth.subset.keep_modalities``), trains a model on it (``mmcds train``'s defaults: the
image steps are skipped, there are no images) and runs ``mmcds evaluate --baseline tfidf`` on its
test split: TF-IDF + logistic regression fitted on the model's training split, scored on the same
test patients, paired bootstrap. The model has the lexical path (``mmcds.fusion.lexical``) unless
``--no-lexical`` (MiniLM chunk embeddings only; its own model folder, ``model-S-minilm``).
Prints one JSON object (training's log goes to stderr); nothing
is asserted. An existing cohort
or model under ``--work`` is reused (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mmcds.fusion.model import FusionModel
from mmcds.settings import Settings
from mmcds.synth import generate_cohort
from mmcds.synth.subset import keep_modalities
from mmcds.training.run import TrainOptions, evaluate_cohort, train_cohort


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=400)
    parser.add_argument("--seed", type=int, default=7, help="cohort seed")
    parser.add_argument("--train-seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/text-baseline"))
    parser.add_argument(
        "--fresh", type=int, default=0,
        help="also score every patient of a fresh notes-only cohort of this size (--fresh-seed)",
    )  # fmt: skip
    parser.add_argument("--fresh-seed", type=int, default=11)
    parser.add_argument("--no-lexical", action="store_true", help="MiniLM chunk embeddings only")
    args = parser.parse_args()

    work: Path = args.work
    name = f"{args.train_seed}-minilm" if args.no_lexical else str(args.train_seed)
    data, model = work / "notes", work / f"model-{name}"
    settings = Settings(model_dir=work / "models", database_url=f"sqlite:///{work}/cache.db")
    timings: dict[str, float] = {}
    if not (data / "labels.csv").is_file():
        t = time.perf_counter()
        generate_cohort(data, patients=args.patients, seed=args.seed)
        keep_modalities(data, ("text",))
        timings["synth_s"] = time.perf_counter() - t
    if not (model / "config.json").is_file():
        t = time.perf_counter()
        options = TrainOptions(seed=args.train_seed, progress=False, lexical=not args.no_lexical)
        train_cohort(data, model, settings, options, echo=lambda s: print(s, file=sys.stderr))
        timings["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics = evaluate_cohort(
        model, data, work / f"eval-{name}", settings,
        n_boot=args.bootstrap, baseline="tfidf", progress=False, echo=lambda s: None,
    )  # fmt: skip
    timings["evaluate_s"] = time.perf_counter() - t
    config = json.loads((model / "config.json").read_text())
    fresh: dict[str, Any] = {}
    if args.fresh:  # nothing was fitted or chosen on these patients: every one is scored
        t = time.perf_counter()
        other = work / f"fresh-{args.fresh_seed}"
        if not (other / "labels.csv").is_file():
            generate_cohort(other, patients=args.fresh, seed=args.fresh_seed)
            keep_modalities(other, ("text",))
        scored = evaluate_cohort(
            model, other, work / f"eval-{name}-fresh", settings,
            n_boot=args.bootstrap, baseline="tfidf", progress=False, echo=lambda s: None,
        )  # fmt: skip
        fresh = {"patients": args.fresh, "seed": args.fresh_seed, **_rows(scored)}
        timings["fresh_s"] = time.perf_counter() - t
    result: dict[str, Any] = {
        "cohort": {"patients": args.patients, "seed": args.seed, "modalities": ["text"]},
        "model": config["version"],
        "lexical_path": config["lexical"] or None,
        "lexical_scale": _lexical_scale(model),
        "split": {k: len(v) for k, v in config["training"]["split"].items()},
        "evaluated": metrics["data"]["split"],
        "baseline": metrics["baseline"]["method"],
        **_rows(metrics),
        "fresh_cohort": fresh,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result, indent=1))


def _lexical_scale(model: Path) -> list[float] | None:
    """The learned weight of the lexical logits per finding (None without the path)."""
    fusion = FusionModel.from_pretrained(model)
    if fusion.lexical is None:
        return None
    return [round(float(x), 3) for x in fusion.lexical_scale.detach()]


def _rows(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "n", "positives", "train_positives", "model_auroc", "model_auroc_ci", "baseline_auroc",
        "baseline_auroc_ci", "model_minus_baseline", "model_minus_baseline_ci", "model_verdict",
        "C",
    )  # fmt: skip
    rows = metrics["baseline"]["findings"]
    return {"findings": {f: {k: row.get(k) for k in keys} for f, row in rows.items()}}


if __name__ == "__main__":
    main()
