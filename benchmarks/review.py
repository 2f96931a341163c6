"""Server time to render one review page and the worklist over many stored analyses. Prints
JSON.

    .venv/bin/python benchmarks/review.py [--analyses 500] [--requests 50] [--model DIR]

One synthetic patient is analysed for real (gather from its bundle and DICOM files, the tiny
local models or ``--model``, the explain stage) and stored; ``--analyses`` more analyses are
stored beside it (the same inputs under other patient ids, random calibrated probabilities,
no images: the worklist reads only assessments). Then, in process through the ASGI app (no
network), the review page, its first image and heatmap, and the worklist of all of them are
each requested ``--requests`` times; ``/healthz`` in the same run is the baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from mmcds.fhir.bundle_source import LocalDicom
from mmcds.records import Patient
from mmcds.service.api import create_app
from mmcds.service.review.tokens import Tokens, hash_password
from mmcds.settings import Settings
from mmcds.synth import generate_cohort
from mmcds.training.dataset import record_from_bundle


def _stats(seconds: list[float]) -> dict[str, float]:
    arr = np.asarray(seconds) * 1000
    return {
        "n": len(seconds),
        "p50_ms": round(float(np.percentile(arr, 50)), 2),
        "p95_ms": round(float(np.percentile(arr, 95)), 2),
        "p99_ms": round(float(np.percentile(arr, 99)), 2),
    }


def _time(client: TestClient, url: str, n: int) -> list[float]:
    client.get(url).raise_for_status()  # warm-up
    out = []
    for _ in range(n):
        start = time.perf_counter()
        client.get(url).raise_for_status()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--analyses", type=int, default=500)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--model", default="", help="a trained fusion model folder")
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory(prefix="mmcds-bench-review-") as tmp:
        root = Path(tmp)
        generate_cohort(root / "cohort", patients=1, seed=11)
        bundle = json.loads(next((root / "cohort").glob("bundles/*.json")).read_text())
        record = record_from_bundle(bundle, LocalDicom.from_folder(root / "cohort"))
        settings = Settings(
            home=root,
            model_dir=root / "models",
            fusion_model=args.model,
            database_url=f"sqlite:///{root / 'service.db'}",
            clinicians={"bench": hash_password("bench-password")},
        )
        app = create_app(settings)
        service = app.state.analysis
        analysis, explanation = service.assess(record)
        started = time.perf_counter()
        for i in range(args.analyses):
            rec = dataclasses.replace(record, patient=Patient(f"bench-{i}"), images=[])
            findings = [
                dataclasses.replace(f, probability=float(rng.beta(1, 4)))
                for f in analysis.assessment.findings
            ]
            assessment = dataclasses.replace(analysis.assessment, findings=findings)
            copy = dataclasses.replace(analysis, record=rec, assessment=assessment)
            exp = dataclasses.replace(explanation, analysis_id=copy.identifier, images=[])
            service.analyses.put(copy, exp)
        store_s = time.perf_counter() - started
        # the same secret file under MMCDS_HOME as the service's, so the same key
        token = Tokens.from_settings(settings).review_link(analysis.identifier)
        with TestClient(app) as client:
            client.post("/login", data={"user": "bench", "password": "bench-password"})
            image = explanation.images[0] if explanation.images else None
            results = {
                "analyses_stored": args.analyses + 1,
                "store_seconds": round(store_s, 2),
                "healthz": _stats(_time(client, "/healthz", args.requests)),
                "review_page": _stats(_time(client, f"/review/{token}", args.requests)),
                "worklist": _stats(_time(client, "/worklist", args.requests)),
            }
            if image is not None:
                results["image_default_preset"] = _stats(
                    _time(client, f"/review/{token}/image/0.png", args.requests)
                )
                results["heatmap_layer"] = _stats(
                    _time(
                        client,
                        f"/review/{token}/heatmap/0/{image.finding}/{image.method}.png",
                        args.requests,
                    )
                )
                results["image_size"] = list(image.original_shape)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
