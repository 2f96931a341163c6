"""Local recalibration: fit each site's calibrator on that site's own labelled patients.

A model trained and calibrated at one hospital is miscalibrated at another: prevalence and case
mix differ, so the same logit means a different risk there. ``mmcds calibrate`` takes a folder of
the deployment site's labelled patients (the cohort layout ``mmcds train`` reads), splits it by
patient and site into a calibration part and a held-out part, fits a calibrator per site on the
calibration part (the global one, fitted where the model was trained, is kept for unknown
sites), and writes a copy of the model folder with the new calibration. The held-out part is
recorded in the copy, and ``mmcds evaluate`` on the same folder scores only it, so the local
check is never made on the patients the calibrators were fitted on.

The network weights and the operating points are not changed: thresholds stay those chosen on
the training site's validation split and apply to the recalibrated probabilities.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmcds.fusion.calibrate import Calibration, SiteRule, fit_site_calibrators
from mmcds.fusion.data import split_patients
from mmcds.fusion.model import CARD_NAME, FusionModel
from mmcds.fusion.train import predict_logits
from mmcds.settings import Settings
from mmcds.training.encoding import encode_all, load_examples, model_pipeline
from mmcds.training.run import Echo


def calibration_split(
    keys: Sequence[str], sites: Sequence[str | None], seed: int, fraction: float
) -> dict[str, list[str]]:
    """Patients to fit on (``calibration``) and to check on (``test``), stratified by site."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the calibration fraction must lie strictly between 0 and 1: {fraction}")
    rest = (1.0 - fraction) / 2
    parts = split_patients(keys, sites, seed, (fraction, rest, rest))
    return {"calibration": parts["train"], "test": sorted(parts["val"] + parts["test"])}


def seen_patients(model: FusionModel) -> set[str]:
    """Every patient key the model's training run used or set aside."""
    split = model.config.training.get("split", {})
    return {k for keys in split.values() for k in keys}


def recalibrate_cohort(
    model_dir: Path,
    data: Path,
    out: Path,
    settings: Settings,
    *,
    fraction: float = 0.5,
    seed: int = 0,
    site_rule: SiteRule = "platt",
    cache_url: str | None = None,
    progress: bool = True,
    echo: Echo = print,
) -> dict[str, Any]:
    """Write ``out``: ``model_dir`` with per-site calibrators fitted on ``data``."""
    if out.resolve() == model_dir.resolve():
        raise ValueError("write the recalibrated model to a new folder; the original is kept")
    model = FusionModel.from_pretrained(model_dir)
    pipe = model_pipeline(model_dir, settings, cache_url)
    seen = seen_patients(model)
    examples = [
        ex
        for ex in load_examples(data, None, progress, model.config.findings)
        if ex.key not in seen
    ]
    if not examples:
        raise ValueError(
            f"every patient in {data} was part of this model's training cohort: calibrate on "
            "patients of the deployment site the model has not seen"
        )
    split = calibration_split(
        [ex.key for ex in examples], [ex.site for ex in examples], seed, fraction
    )
    fit_keys = set(split["calibration"])
    encoded = encode_all(pipe, [ex for ex in examples if ex.key in fit_keys], progress)
    cal = Calibration.from_json(model.config.calibration, model.config.findings)
    fitted = fit_site_calibrators(
        predict_logits(model, encoded.encodings),
        encoded.labels,
        model.config.findings,
        encoded.sites,
        cal.global_,
        cal.method,
        site_rule,
    )
    cal.sites.update(fitted)
    cal.aliases.update(
        {img.site: ex.site for ex in examples for img in ex.record.images if img.site and ex.site}
    )
    named = [site or "" for site in encoded.sites]  # "" = no site recorded
    per_site = {site: named.count(site) for site in sorted(set(named))}
    summary = {
        "data": str(data),
        "seed": seed,
        "fraction": fraction,
        "site_rule": site_rule,
        "patients": per_site,
        "fitted": {site: sorted(table) for site, table in fitted.items()},
        "calibration": split["calibration"],
        "test": split["test"],
    }
    config = model.config
    config.calibration = cal.to_json()
    config.training["local_calibration"] = summary
    digest = hashlib.sha256("|".join(split["calibration"]).encode()).hexdigest()[:8]
    config.version = f"{config.version.split('+')[0]}+local-{digest}"
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    config.save(out)
    card = out / CARD_NAME
    card.write_text(card.read_text() + local_card_section(summary, config.version))
    sizes = ", ".join(f"{s or 'no site'} {n}" for s, n in per_site.items())
    echo(
        f"calibrated {config.version} on {len(split['calibration'])} patients ({sizes}); "
        f"{len(split['test'])} held out for `mmcds evaluate`; wrote {out}"
    )
    return summary


def local_card_section(summary: dict[str, Any], version: str) -> str:
    fitted = "; ".join(f"{s}: {', '.join(f)}" for s, f in summary["fitted"].items()) or "none"
    sizes = ", ".join(f"{s} {n}" for s, n in summary["patients"].items())
    return f"""
## Local calibration ({version})
Recalibrated with `mmcds calibrate` on `{summary["data"]}`: {len(summary["calibration"])}
patients the training run never saw ({sizes}), rule `{summary["site_rule"]}`. Site calibrators
fitted: {fitted}. {len(summary["test"])} patients of that folder were held out; `mmcds evaluate`
on it scores only them. Weights and operating points are unchanged.
"""
