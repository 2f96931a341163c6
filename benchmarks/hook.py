"""End-to-end latency of the patient-view hook, as an EHR sees it. Prints JSON.

    .venv/bin/python benchmarks/hook.py [--patients 20] [--seed 11]

Starts the FHIR sandbox, Orthanc and the service with the demo's trained model (trained at first
use), loads synthetic patients, then calls the hook for each patient twice over HTTP:
- cold: the analysis a queue worker runs (``AnalysisService.run_job``: gather + encode + fuse +
  explain + write-back + store the answer), in this process;
- warm: the hook over HTTP, answered from the stored analysis after the currency check.
Reports p50/p95/p99 and throughput for each, and cold/warm as the ratio against the cached path
measured in the same run. CDS Hooks asks for answers "on the order of 500 ms".
"""

from __future__ import annotations

import argparse
import json
import os
import time

import httpx
import numpy as np

from mmcds.dev.demo import demo_service
from mmcds.service.analysis import AnalysisService


def _stats(seconds: list[float], wall: float) -> dict[str, float]:
    arr = np.asarray(seconds)
    return {
        "n": len(seconds),
        "p50_s": round(float(np.percentile(arr, 50)), 4),
        "p95_s": round(float(np.percentile(arr, 95)), 4),
        "p99_s": round(float(np.percentile(arr, 99)), 4),
        "max_s": round(float(arr.max()), 4),
        "hooks_per_s": round(len(seconds) / wall, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with (
        demo_service(
            patients=args.patients, seed=args.seed, echo=lambda _: None, ingest=False
        ) as service,
        httpx.Client(timeout=300) as http,
    ):
        # Cold: the analysis a queue worker runs for a patient (hooks never run it); the first
        # also loads the models, so it is timed apart. Warm: the hook, answered from the store.
        worker = AnalysisService(service.settings)
        ids = service.patient_ids
        started = time.perf_counter()
        worker.run_job(service.fhir_base, ids[0])
        load_s = time.perf_counter() - started
        results = {}
        times = []
        started = time.perf_counter()
        for patient_id in ids[1:]:
            t0 = time.perf_counter()
            worker.run_job(service.fhir_base, patient_id)
            times.append(time.perf_counter() - t0)
        results["cold"] = _stats(times, time.perf_counter() - started)
        times = []
        started = time.perf_counter()
        for patient_id in ids:
            response, seconds = service.call(http, patient_id)
            response.raise_for_status()
            assert "in progress" not in response.json()["cards"][0]["summary"]
            times.append(seconds)
        results["warm"] = _stats(times, time.perf_counter() - started)
    print(
        json.dumps(
            {
                "patients": args.patients,
                "first_analysis_incl_model_load_s": round(load_s, 3),
                **results,
                "cold_over_warm_p50": round(results["cold"]["p50_s"] / results["warm"]["p50_s"], 2),
                "load_average": os.getloadavg(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
