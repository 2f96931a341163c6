"""Cold analysis of a patient with a full-size radiograph, and what overlays and write-back cost.

    .venv/bin/python benchmarks/writeback.py [--patients 6] [--rows 3000 --cols 2500]

Starts the FHIR sandbox and Orthanc, writes synthetic patients twice: as generated (~300 px
images, the baseline) and with the radiograph resampled to full size (real CR/DX images are
2,000-3,000 px a side). Each patient is analysed once through ``AnalysisService.analyse`` (the
hook's path: gather, encode, fuse, explain, report bundle, outbox, write-back), with nothing
cached. Prints JSON: p50/p95 of the whole analysis per size, the share spent composing overlays
(``review_grey`` once per image, ``overlay_png`` per map) and on the report bundle +
write-back, and full-size/baseline ratios.
The models are the tiny local ones the tests use (``Settings`` defaults under a temp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import mmcds.explain.stage as explain_stage
import mmcds.service.analysis as analysis_module
from mmcds.dev.fullsize import enlarge_images, load_cohort, local_settings
from mmcds.dev.servers import FhirSandbox, OrthancPacs
from mmcds.fusion.pipeline import Pipeline
from mmcds.service.analysis import AnalysisService, Trigger
from mmcds.synth import generate_cohort

SPENT: dict[str, float] = defaultdict(float)


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - start

    return wrapper


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values), q)), 3)


def run(folder: Path, pacs: OrthancPacs, service: AnalysisService, fhir_url: str) -> dict[str, Any]:
    ids = load_cohort(folder, fhir_url, pacs)
    totals, overlays, writeback, states = [], [], [], []
    for patient_id in ids:
        SPENT.clear()
        start = time.perf_counter()
        result = service.analyse(Trigger(patient_id, fhir_url))
        totals.append(time.perf_counter() - start)
        overlays.append(SPENT["overlays"])
        writeback.append(SPENT["report"] + SPENT["write_back"])
        states.append(result.delivery.status if result.delivery else "none")
    share = lambda part: round(float(np.sum(part) / np.sum(totals)), 3)  # noqa: E731
    return {
        "patients": len(ids),
        "p50_s": _pct(totals, 50),
        "p95_s": _pct(totals, 95),
        "overlays_share": share(overlays),
        "report_and_write_back_share": share(writeback),
        "overlays_p50_s": _pct(overlays, 50),
        "report_and_write_back_p50_s": _pct(writeback, 50),
        "delivered": states.count("delivered"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--cols", type=int, default=2500)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    explain_stage.overlay_png = timed("overlays", explain_stage.overlay_png)  # type: ignore[attr-defined]
    explain_stage.review_grey = timed("overlays", explain_stage.review_grey)  # type: ignore[attr-defined]
    analysis_module.report_bundle = timed("report", analysis_module.report_bundle)  # type: ignore[attr-defined]
    AnalysisService.write_back = timed("write_back", AnalysisService.write_back)  # type: ignore[method-assign]

    out: dict[str, Any] = {"rows": args.rows, "cols": args.cols}
    with tempfile.TemporaryDirectory() as tmp, FhirSandbox() as fhir, OrthancPacs() as pacs:
        root = Path(tmp)
        settings = local_settings(root, fhir.base_url, pacs, root / "models")
        service = AnalysisService(settings, pipeline=Pipeline.from_settings(settings))
        # Warm-up (model load, first-call costs) on a patient of its own, not timed.
        generate_cohort(root / "warm", patients=1, seed=args.seed + 1000)
        run(root / "warm", pacs, service, fhir.base_url)
        for name in ("baseline", "full_size"):
            fhir.reset()
            pacs.reset()
            folder = root / name
            generate_cohort(folder, patients=args.patients, seed=args.seed)
            if name == "full_size":
                enlarge_images(folder, args.rows, args.cols)
            out[name] = run(folder, pacs, service, fhir.base_url)
    out["ratio_p50_full_vs_baseline"] = round(
        out["full_size"]["p50_s"] / out["baseline"]["p50_s"], 2
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
