"""Start-up time, memory and Synthea load time of the test servers.

    .venv/bin/python benchmarks/servers.py [--repeat 3]

Prints figures for the README; never a timed assertion in the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import httpx

from mmcds.dev.servers import FhirSandbox, OrthancPacs

REPO_ROOT = Path(__file__).resolve().parent.parent
SYNTHEA = REPO_ROOT.parent / "shared" / "data" / "synthea-r4"
FHIR_JSON = {"Content-Type": "application/fhir+json", "Prefer": "return=minimal"}


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def bench_sandbox(bundles: list[Path]) -> None:
    started = time.perf_counter()
    with FhirSandbox() as sandbox:
        up = time.perf_counter() - started
        print(f"FHIR sandbox: ready in {up:.2f} s, RSS {_mb(sandbox.rss_bytes())}")
        if not bundles:
            return
        with httpx.Client(base_url=sandbox.base_url, headers=FHIR_JSON, timeout=120) as client:
            t0 = time.perf_counter()
            for path in bundles:
                client.post("", content=path.read_bytes()).raise_for_status()
            load = time.perf_counter() - t0
            total = client.get("/Observation", params={"_count": "0"}).json()["total"]
            patient = client.get("/Patient", params={"_count": "1"}).json()["entry"][0]
            latencies = []
            for _ in range(50):
                t1 = time.perf_counter()
                client.get("/Observation", params={"patient": patient["resource"]["id"]})
                latencies.append(time.perf_counter() - t1)
        print(
            f"  {len(bundles)} Synthea transactions in {load:.2f} s ({total} Observations); "
            f"RSS after {_mb(sandbox.rss_bytes())}; Observation?patient= p50 "
            f"{statistics.median(latencies) * 1000:.1f} ms"
        )


def bench_orthanc() -> None:
    started = time.perf_counter()
    pacs = OrthancPacs().start()
    up = time.perf_counter() - started
    rss = pacs.rss_bytes()
    t0 = time.perf_counter()
    pacs.stop()
    print(f"Orthanc: ready in {up:.2f} s, RSS {_mb(rss)}, stop {time.perf_counter() - t0:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    bundles = sorted(SYNTHEA.glob("*.json")) if SYNTHEA.is_dir() else []
    for _ in range(args.repeat):
        bench_sandbox(bundles)
        bench_orthanc()


if __name__ == "__main__":
    main()
