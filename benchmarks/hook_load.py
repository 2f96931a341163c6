"""Hook latency and throughput under load, against a bare FastAPI endpoint in the same run.

    .venv/bin/python benchmarks/hook_load.py [--patients 4] [--workers 1,2] [--requests 600]
        [--rounds 3]

Real parts: the FHIR sandbox, Orthanc, PostgreSQL (the queue), and the service and the bare
endpoint each in their own uvicorn process (``benchmarks/hook_load_apps.py``). Patients are
ingested first (``AnalysisService.ingest``), so *warm* hooks answer from stored analyses after
the currency check; *miss* hooks name loaded patients with no analysis (no worker runs, so every
one stays a miss and answers "in progress"). The load generator is one asyncio process with
pre-signed JWTs (a fresh ``jti`` per call), c concurrent clients, each with its own connection.
The baseline runs with the service's uvicorn flags and process count, gets the same warm-up,
and the two take turns in ``--rounds`` slices of each measurement (new connections per slice;
each client's first call, its set-up and connect, is neither timed nor counted).
Currency checks (``--modes``): ``fhir`` (one batch request to the sandbox per hook),
``fhir+prefetch`` (the same service, the hooks carrying the currency prefetch an EHR would send:
no FHIR request), ``notifications`` (the stored row's mark). Also measured apart, to show where
a hook's time goes: the FHIR batch currency check straight
to the sandbox, JWT verification, and the stored-answer lookup. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
from joserfc.jwk import ECKey, RSAKey

from mmcds.dev.servers import FhirSandbox, OrthancPacs, free_port
from mmcds.fhir.client import FhirClient
from mmcds.fhir.dicomweb import DicomWebClient
from mmcds.fhir.load import load_folder
from mmcds.service.analysis import AnalysisService
from mmcds.service.auth import JwtVerifier, sign_hook_jwt
from mmcds.service.fast_path import PATIENT_ID, batch_request, currency_templates
from mmcds.settings import Settings
from mmcds.synth import generate_cohort

ISSUER = "https://ehr.bench.mmcds.local"
KID = "bench-key"
# The queue's database; MMCDS_TEST_POSTGRES_URL as in the tests (a checkout's own database).
POSTGRES = os.environ.get(
    "MMCDS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
HERE = Path(__file__).resolve().parent
SERVICE = "mmcds-patient-view"


def _stats(seconds: list[float], wall: float) -> dict[str, float]:
    """Latency percentiles of ``seconds``; throughput = the timed requests over ``wall``."""
    ms = np.asarray(seconds) * 1000
    return {
        "n": len(seconds),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
        "per_s": round(len(seconds) / wall, 1),
    }


def _env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"MMCDS_{name.upper()}"] = (
                json.dumps(value) if isinstance(value, list | dict) else str(value)
            )
    return env


@contextmanager
def uvicorn_process(factory: str, port: int, env: dict[str, str], workers: int) -> Iterator[str]:
    argv = [sys.executable, "-m", "uvicorn", f"hook_load_apps:{factory}", "--factory"]
    argv += ["--app-dir", str(HERE), "--port", str(port), "--workers", str(workers)]
    argv += ["--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{factory} exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                httpx.get(f"{url}/cds-services", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{factory} did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


class Caller:
    """Signs and writes hook requests as an EHR would; with ``prefetch`` (per patient id) the
    body carries it, as an EHR that runs the service's prefetch templates sends it."""

    def __init__(self, key: ECKey | RSAKey, alg: str, public_base: str, fhir_url: str) -> None:
        self.key, self.alg, self.fhir_url = key, alg, fhir_url
        self.audience = f"{public_base}/cds-services/{SERVICE}"
        self.prefetch: dict[str, dict[str, Any]] | None = None

    def requests(self, patient_ids: list[str], n: int) -> list[tuple[str, bytes]]:
        """n (token, body) pairs, signed before timing starts."""
        out = []
        for i in range(n):
            patient_id = patient_ids[i % len(patient_ids)]
            body: dict[str, Any] = {
                "hookInstance": str(uuid.uuid4()),
                "hook": "patient-view",
                "fhirServer": self.fhir_url,
                "context": {"userId": "Practitioner/b", "patientId": patient_id},
            }
            if self.prefetch is not None:
                body["prefetch"] = self.prefetch[patient_id]
            token = sign_hook_jwt(
                self.key, issuer=ISSUER, audience=self.audience, kid=KID, alg=self.alg
            )
            out.append((token, json.dumps(body).encode()))
        return out


def currency_prefetch(fhir_url: str, patient_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Per patient, what an EHR sends for the service's currency prefetch templates."""
    return {
        pid: {
            key: httpx.get(f"{fhir_url}/{t.replace(PATIENT_ID, pid)}").raise_for_status().json()
            for key, t in currency_templates().items()
        }
        for pid in patient_ids
    }


async def _load(
    url: str, calls: list[tuple[str, bytes]], concurrency: int
) -> tuple[list[float], float, dict[str, int]]:
    """Latencies and wall time of ``calls`` from ``concurrency`` clients on open connections.

    An EHR keeps its connection open, so each client first makes one untimed call (its client
    set-up and TCP connect), and the clock starts once every client has: throughput is the
    timed calls over the time they took. (Timing the set-up too charged each slice a fixed
    ~10 ms per client, which cut the faster side's rate most: the bare endpoint's.)"""
    latencies: list[float] = []
    summaries: dict[str, int] = {}
    queue = iter(calls)
    connected = 0
    ready = asyncio.Event()
    started = 0.0

    async def call(http: httpx.AsyncClient, token: str, body: bytes) -> None:
        response = await http.post(
            f"/cds-services/{SERVICE}",
            content=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        response.raise_for_status()
        cards = response.json()["cards"]
        summary = cards[0]["summary"] if cards else "(no card)"
        if cards and "Not confirmed current" in cards[0].get("detail", ""):
            summary += " [over budget: not confirmed current]"
        summaries[summary] = summaries.get(summary, 0) + 1

    async def client() -> None:
        nonlocal connected, started
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            await call(http, *next(queue))  # untimed: set-up and connect
            connected += 1
            if connected == concurrency:
                started = time.perf_counter()
                ready.set()
            await ready.wait()
            for token, body in queue:
                sent = time.perf_counter()
                await call(http, token, body)
                latencies.append(time.perf_counter() - sent)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started, summaries


def load(url: str, calls: list[tuple[str, bytes]], concurrency: int) -> dict[str, Any]:
    latencies, wall, summaries = asyncio.run(_load(url, calls, concurrency))
    return {**_stats(latencies, wall), "answers": summaries}


def load_alternating(
    urls: dict[str, str], calls: dict[str, list[tuple[str, bytes]]], c: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """Each url's calls in ``rounds`` slices, the urls taking turns: on a shared machine the
    load of other work changes by the minute, and both sides then see the same (a side run
    after the other saw a different machine). Figures over all of a url's slices, and each
    slice's throughput (``per_s_slices``: how much the figure moves within one run)."""
    seen: dict[str, tuple[list[float], float, dict[str, int]]] = {u: ([], 0.0, {}) for u in urls}
    slices: dict[str, list[float]] = {u: [] for u in urls}
    for r in range(rounds):
        for name, url in urls.items():
            todo = calls[name][r::rounds]
            latencies, wall, summaries = asyncio.run(_load(url, todo, c))
            lat, total, answers = seen[name]
            lat += latencies
            for summary, count in summaries.items():
                answers[summary] = answers.get(summary, 0) + count
            seen[name] = (lat, total + wall, answers)
            slices[name].append(round(len(latencies) / wall, 1))
    return {
        n: {**_stats(lat, wall), "per_s_slices": slices[n], "answers": a}
        for n, (lat, wall, a) in seen.items()
    }


async def _fhir_batches(
    fhir_url: str, patient_ids: list[str], n: int, c: int
) -> tuple[list[float], float]:
    latencies: list[float] = []
    todo = iter(range(n))

    async def client() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            for i in todo:
                started = time.perf_counter()
                r = await http.post(fhir_url, json=batch_request(patient_ids[i % len(patient_ids)]))
                r.raise_for_status()
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(c)))
    return latencies, time.perf_counter() - started


def components(
    settings: Settings, caller: Caller, fhir_url: str, ids: list[str], n: int
) -> dict[str, Any]:
    """Where a warm hook's time goes, each part measured alone."""
    verifier = JwtVerifier(settings.trusted_issuers)
    tokens = [t for t, _ in caller.requests(ids, n)]
    started = time.perf_counter()
    for token in tokens:
        verifier.verify(f"Bearer {token}", caller.audience)
    jwt_ms = (time.perf_counter() - started) / n * 1000
    service = AnalysisService(
        settings.model_copy(update={"queue_url": None, "database_url": settings.database_url})
    )
    started = time.perf_counter()
    for i in range(n):
        service.analyses.get_answer(fhir_url, ids[i % len(ids)])
    lookup_ms = (time.perf_counter() - started) / n * 1000
    batches = {}
    for c in (1, 8):
        lat, wall = asyncio.run(_fhir_batches(fhir_url, ids, n, c))
        batches[f"c{c}"] = _stats(lat, wall)
    return {
        "jwt_verify_ms_per_call": round(jwt_ms, 3),
        "answer_db_lookup_ms_per_call": round(lookup_ms, 3),
        "fhir_currency_batch": batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--workers", default="1,2", help="service processes to try, e.g. 1,2")
    parser.add_argument(
        "--modes",
        default="fhir,fhir+prefetch,notifications",
        help="MMCDS_CURRENCY_CHECK values to try; fhir+prefetch: fhir, the hooks prefetched",
    )
    parser.add_argument("--requests", type=int, default=600, help="per run at 8 and 32 clients")
    parser.add_argument(
        "--rounds", type=int, default=3, help="slices in which service and baseline alternate"
    )
    parser.add_argument("--alg", default="ES384", choices=["ES384", "RS384"], help="hook JWTs")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # CDS Hooks 2.0: the EHR signs with ES384 or RS384; the check costs 0.4-0.6 ms and 0.03 ms.
    key: ECKey | RSAKey = (
        ECKey.generate_key("P-384", parameters={"kid": KID})
        if args.alg == "ES384"
        else RSAKey.generate_key(2048, parameters={"kid": KID})
    )
    schema = f"mmcds_queue_bench_{uuid.uuid4().hex[:8]}"
    results: dict[str, Any] = {
        "load_average_before": os.getloadavg(),
        "cpus": os.cpu_count(),
        "alternating_rounds": args.rounds,
        "jwt_alg": args.alg,
    }
    with (
        tempfile.TemporaryDirectory(prefix="mmcds-bench-") as tmp,
        FhirSandbox() as fhir_box,
        OrthancPacs() as pacs,
    ):
        generate_cohort(Path(tmp) / "cohort", patients=args.patients + 2, seed=3)
        with (
            FhirClient(fhir_box.base_url, timeout=120) as fhir,
            DicomWebClient(pacs.dicomweb_url, auth=pacs.auth) as dicom,
        ):
            assert not load_folder(Path(tmp) / "cohort", fhir, dicom).errors
            ids = [p["id"] for p in fhir.search("Patient", {"_count": "100"})]
        warm_ids, miss_ids = ids[: args.patients], ids[args.patients :]
        port = free_port()
        base = Settings()
        settings = base.model_copy(
            update={
                "port": port,
                "public_base_url": f"http://127.0.0.1:{port}",
                "fhir_allowlist": [fhir_box.base_url],
                "fhir_base_url": fhir_box.base_url,
                "dicomweb_url": pacs.dicomweb_url,
                "dicomweb_user": pacs.auth[0],
                "dicomweb_password": pacs.auth[1],
                "trusted_issuers": {ISSUER: json.dumps({"keys": [key.as_dict(private=False)]})},
                "database_url": f"sqlite:///{tmp}/service.db",
                "queue_url": POSTGRES,
                "queue_schema": schema,
            }
        )
        started = time.perf_counter()
        AnalysisService(settings).ingest(fhir_box.base_url, warm_ids, now=True)
        results["ingest_s_per_patient"] = round((time.perf_counter() - started) / len(warm_ids), 2)
        caller = Caller(key, args.alg, settings.public_base_url, fhir_box.base_url)
        env = _env(settings)
        card_file = Path(tmp) / "card.json"
        try:
            results["components"] = components(settings, caller, fhir_box.base_url, warm_ids, 300)
            runs = [(m, int(w)) for m in args.modes.split(",") for w in args.workers.split(",")]
            for mode, workers in runs:
                check, _, prefetched = mode.partition("+")
                mode_env = {**env, "MMCDS_CURRENCY_CHECK": check}
                caller.prefetch = currency_prefetch(fhir_box.base_url, ids) if prefetched else None
                with uvicorn_process("service", port, mode_env, workers) as url:
                    token, body = caller.requests(warm_ids, 1)[0]
                    first = httpx.post(
                        f"{url}/cds-services/{SERVICE}",
                        content=body,
                        headers={
                            "Authorization": f"Bearer {token}",
                            "Content-Type": "application/json",
                        },
                    ).json()
                    card_file.write_text(json.dumps(first))
                    bare_port = free_port()
                    # The baseline runs as the service does (same uvicorn flags, loop and HTTP
                    # parser, same number of processes) and gets the same warm-up.
                    with uvicorn_process(
                        "bare", bare_port, {**env, "HOOK_LOAD_CARD": str(card_file)}, workers
                    ) as bare_url:
                        run: dict[str, Any] = {"card_bytes": len(json.dumps(first))}
                        for c in (1, 8, 32):
                            n = args.requests // 3 if c == 1 else args.requests
                            load(url, caller.requests(warm_ids, 50), c)  # warm-up
                            load(bare_url, caller.requests(warm_ids, 50), c)  # warm-up
                            both = load_alternating(
                                {"warm_hook": url, "bare": bare_url},
                                {k: caller.requests(warm_ids, n) for k in ("warm_hook", "bare")},
                                c,
                                args.rounds,
                            )
                            warm, bare = both["warm_hook"], both["bare"]
                            run[f"c{c}"] = {
                                "warm_hook": warm,
                                "bare": bare,
                                "throughput_ratio": round(warm["per_s"] / bare["per_s"], 3),
                                "throughput_ratio_slices": [
                                    round(w / b, 3)
                                    for w, b in zip(
                                        warm["per_s_slices"], bare["per_s_slices"], strict=True
                                    )
                                ],
                            }
                        run["miss_c8"] = load(url, caller.requests(miss_ids, args.requests // 2), 8)
                        run["miss_budget_ms"] = settings.hook_budget_ms
                    results[f"service_{mode}_workers_{workers}"] = run
        finally:
            with psycopg.connect(POSTGRES.replace("+psycopg", ""), autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
