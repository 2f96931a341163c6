"""Operating the queued path: ``/metrics`` after hooks that queue work, a worker that runs it and
feedback from both the EHR and the review page; ``mmcds worker``'s own probes and its drain on
SIGTERM. Real FHIR sandbox, Orthanc, PostgreSQL queue and procrastinate workers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from joserfc.jwk import ECKey
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from mmcds.cli import app as cli
from mmcds.dev.servers import free_port
from mmcds.findings import SYNTH_FINDINGS
from mmcds.fusion.pipeline import Pipeline
from mmcds.service.analysis import AnalysisService
from mmcds.service.api import create_app
from mmcds.service.auth import sign_hook_jwt
from mmcds.service.queue import QUEUE, TASK, WorkQueue
from mmcds.settings import Settings, get_settings

SERVICE = "mmcds-patient-view"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


def _signed(settings: Settings, key: ECKey, path: str) -> dict[str, str]:
    (issuer,) = settings.trusted_issuers
    jwt = sign_hook_jwt(
        key, issuer=issuer, audience=f"{settings.public_base_url}{path}", kid=key.kid
    )
    return {"Authorization": f"Bearer {jwt}"}


def _hook(client: TestClient, settings: Settings, key: ECKey, patient_id: str) -> dict[str, Any]:
    path = f"/cds-services/{SERVICE}"
    body = {
        "hookInstance": str(uuid.uuid4()),
        "hook": "patient-view",
        "fhirServer": settings.fhir_base_url,
        "context": {"userId": "Practitioner/ops", "patientId": patient_id},
    }
    response = client.post(path, json=body, headers=_signed(settings, key, path))
    assert response.status_code == 200, response.text
    (card,) = response.json()["cards"]
    return card


def test_metrics_count_queued_work_and_feedback_once(
    make_settings: Callable[..., Settings],
    ehr_key: ECKey,
    pipeline: Pipeline,
    load_cohort: Callable[[Path | None], list[str]],
    fhir_url: str,
    dicomweb: Any,
    postgres_url: str,
    queue_schema: str,
    tmp_path: Path,
    captured_logs: io.StringIO,
) -> None:
    ids = load_cohort(None)
    settings = make_settings(
        [fhir_url], dicomweb, hook_answer="stored", queue_url=postgres_url,
        queue_schema=queue_schema, home=tmp_path,
    )  # fmt: skip
    app = create_app(settings, pipeline)
    with TestClient(app) as client:
        service: AnalysisService = app.state.analysis

        def depth() -> float:
            return _value(_scrape(client.get("/metrics").text), "mmcds_queue_depth", queue=QUEUE)

        before = _scrape(client.get("/metrics").text)
        assert before[("mmcds_queue_depth", (("queue", QUEUE),))] == 0  # shown at 0, not absent
        # Misses queue one analysis per patient, however many hooks ask (the queueing lock).
        _hook(client, settings, ehr_key, ids[0])
        _until(lambda: depth() == 1)  # a loaded machine may finish the deferral after answering
        _hook(client, settings, ehr_key, ids[0])
        _hook(client, settings, ehr_key, ids[1])
        _until(lambda: depth() == 2)
        queued = _scrape(client.get("/metrics").text)
        # The gauge is read from the queue's table: what any replica queued, not this app. A
        # deferral through another connection (as `mmcds ingest` elsewhere) shows up here.
        other = WorkQueue(settings).open()
        try:
            assert other.defer(settings.fhir_base_url, "not-loaded-patient")
        finally:
            other.close()
        assert depth() == 3
        with psycopg.connect(postgres_url.replace("+psycopg", "")) as conn:
            conn.execute(f'SET search_path TO "{queue_schema}"')  # for procrastinate's triggers
            conn.execute(
                "DELETE FROM procrastinate_jobs WHERE args->>%s = %s",
                ("patient_id", "not-loaded-patient"),
            )
        assert depth() == 2

        WorkQueue(settings, handler=service.run_job).run_worker(burst=True)
        worked = _scrape(client.get("/metrics").text)
        assert _value(worked, "mmcds_queue_depth", queue=QUEUE) == 0

        # Feedback: from the EHR (a retry of the same outcome is one record) and the review page.
        card = _hook(client, settings, ehr_key, ids[0])
        assert "in progress" not in card["summary"], card  # answered from the store
        other_card = _hook(client, settings, ehr_key, ids[1])
        path = f"/cds-services/{SERVICE}/feedback"
        overridden = {
            "card": card["uuid"],
            "outcome": "overridden",
            "overrideReason": {"reason": card["overrideReasons"][0]},
            "outcomeTimestamp": "2026-12-07T08:00:00Z",
        }
        accepted = {"card": other_card["uuid"], "outcome": "accepted",
                    "outcomeTimestamp": "2026-12-07T08:01:00Z"}  # fmt: skip
        for items, recorded in (([overridden], 1), ([overridden], 0), ([overridden, accepted], 1)):
            sent = client.post(
                path, json={"feedback": items}, headers=_signed(settings, ehr_key, path)
            )
            assert sent.status_code == 200 and sent.json()["recorded"] == recorded, sent.text
        (link,) = card["links"]
        review = link["url"].removeprefix(settings.public_base_url)
        page = client.post(
            f"{review}/feedback", data={"outcome": "accepted"}, follow_redirects=False
        )
        assert page.status_code == 303
        refused = client.post(f"{review}/feedback", data={"outcome": "maybe"})
        assert refused.status_code == 400
        after = _scrape(client.get("/metrics").text)
        assert client.get("/readyz").json()["checks"]["queue"] == "ok"

        # The queue's tables gone (a database being restored): the scrape still answers, the
        # gauge goes absent (alerts use absent()), and readiness names the queue.
        with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{queue_schema}" CASCADE')
        broken = client.get("/metrics")
        assert broken.status_code == 200 and "mmcds_outbox_reports_by_state{" in broken.text
        assert "mmcds_queue_depth{" not in broken.text
        assert (
            client.get("/readyz").json()["checks"]["queue"] == "queue unreachable (UndefinedTable)"
        )

    def moved(name: str, start: Samples, end: Samples, **labels: str) -> float:
        return _value(end, name, **labels) - _value(start, name, **labels)

    # The queue logged its jobs (deferred by hooks, run by the worker) without their arguments:
    # a patient id is an identifier.
    logged = captured_logs.getvalue()
    assert '"logger": "procrastinate.jobs"' in logged and "mmcds.analyse_patient[" in logged
    assert not [i for i in ids if i in logged], "a patient id reached the log"

    feedback = "mmcds_card_feedback_total"
    assert moved(feedback, before, after, outcome="overridden") == 1
    assert moved(feedback, before, after, outcome="accepted") == 2  # EHR once, review page once
    assert len(app.state.feedback.list()) == 3  # the store agrees with the counter
    hooks = "mmcds_hook_responses_total"
    assert moved(hooks, before, after, service=SERVICE, code="200") == 5
    # The worker's two analyses were counted where they ran (here, the same process).
    for finding in SYNTH_FINDINGS:  # what the tiny untrained model assesses
        shown = sum(
            moved("mmcds_finding_outcomes_total", queued, worked, finding=finding, outcome=o)
            for o in ("info", "warning", "critical", "abstained", "not_validated",
                      "insufficient_inputs")
        )  # fmt: skip
        assert shown == 2, finding


def _job_status(postgres_url: str, schema: str) -> list[str]:
    with psycopg.connect(postgres_url.replace("+psycopg", "")) as conn:
        rows = conn.execute(
            f'SELECT status::text FROM "{schema}".procrastinate_jobs WHERE task_name = %s',
            (TASK,),
        ).fetchall()
    return [r[0] for r in rows]


def _worker_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    """Environment of an ``mmcds worker`` process with these settings (its own store)."""
    assert settings.queue_url and settings.dicomweb_user and settings.dicomweb_password
    return os.environ | {
        "MMCDS_FHIR_BASE_URL": settings.fhir_base_url,
        "MMCDS_FHIR_ALLOWLIST": json.dumps(settings.fhir_allowlist),
        "MMCDS_DICOMWEB_URL": settings.dicomweb_url,
        "MMCDS_DICOMWEB_USER": settings.dicomweb_user,
        "MMCDS_DICOMWEB_PASSWORD": settings.dicomweb_password,
        "MMCDS_DATABASE_URL": f"sqlite:///{tmp_path / 'worker.db'}",
        "MMCDS_HOME": str(tmp_path),
        "MMCDS_MODEL_DIR": str(tmp_path / "models"),
        "MMCDS_QUEUE_URL": settings.queue_url,
        "MMCDS_QUEUE_SCHEMA": settings.queue_schema,
        "MMCDS_HOST": "127.0.0.1",
        "MMCDS_SHUTDOWN_GRACE_S": "120",
    }


@contextlib.contextmanager
def _worker(settings: Settings, tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``mmcds worker ARGS`` in a process of its own, logging to tmp_path/worker.log."""
    mmcds = str(Path(sys.executable).parent / "mmcds")
    with (tmp_path / "worker.log").open("w") as log:
        worker = subprocess.Popen([mmcds, "worker", *args], env=_worker_env(settings, tmp_path),
                                  stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            yield worker
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def test_worker_serves_probes_and_finishes_its_job_on_sigterm(
    make_settings: Callable[..., Settings],
    load_cohort: Callable[[Path | None], list[str]],
    fhir_url: str,
    dicomweb: Any,
    postgres_url: str,
    queue_schema: str,
    tmp_path: Path,
) -> None:
    """``mmcds worker --health-port`` as Kubernetes runs it: ready only once its models are
    loaded and the queue answers; SIGTERM while a job runs lets that job finish, then exits 0."""
    ids = load_cohort(None)
    settings = make_settings(
        [fhir_url], dicomweb, queue_url=postgres_url, queue_schema=queue_schema
    )
    port = free_port()
    with _worker(settings, tmp_path, "--health-port", str(port)) as worker:

        def ready() -> bool:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            try:
                return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        base = f"http://127.0.0.1:{port}"
        _until(ready, timeout_s=300)  # builds and loads the tiny models first
        checks = httpx.get(f"{base}/readyz").json()["checks"]
        assert checks == {"database": "ok", "models": "ok", "fhir": "ok", "queue": "ok"}
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
        metrics = _scrape(httpx.get(f"{base}/metrics").text)
        assert _value(metrics, "mmcds_queue_depth", queue=QUEUE) == 0
        queue = WorkQueue(settings).open()
        try:
            assert queue.defer(fhir_url, ids[0])
        finally:
            queue.close()
        _until(lambda: _job_status(postgres_url, queue_schema) == ["doing"], timeout_s=60)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=120) == 0, (tmp_path / "worker.log").read_text()
        assert "Stopped worker" in (tmp_path / "worker.log").read_text()
        assert _job_status(postgres_url, queue_schema) == ["succeeded"]


def test_a_job_of_a_killed_worker_is_queued_again_and_done(
    make_settings: Callable[..., Settings],
    pipeline: Pipeline,
    load_cohort: Callable[[Path | None], list[str]],
    fhir_url: str,
    dicomweb: Any,
    postgres_url: str,
    queue_schema: str,
    tmp_path: Path,
) -> None:
    """A worker SIGKILLed mid-job (its pod's grace ran out, OOM) leaves the job "doing"; the
    stalled-job sweep hands it back once the worker's heartbeat is stale, and another worker
    does it. (The sweep runs every minute with a 60 s threshold; here it is called at 0 s.)"""
    ids = load_cohort(None)
    settings = make_settings(
        [fhir_url], dicomweb, queue_url=postgres_url, queue_schema=queue_schema
    )
    with _worker(settings, tmp_path) as worker:
        queue = WorkQueue(settings).open()
        try:
            assert queue.defer(fhir_url, ids[0])
        finally:
            queue.close()
        _until(lambda: _job_status(postgres_url, queue_schema) == ["doing"], timeout_s=300)
        worker.kill()
        worker.wait()

    async def sweep(seconds: float) -> int:
        queue = WorkQueue(settings)
        await queue.open_async()
        try:
            return await queue.retry_stalled(seconds)
        finally:
            await queue.close_async()

    assert asyncio.run(sweep(60)) == 0  # the dead worker beat less than a minute ago
    assert _job_status(postgres_url, queue_schema) == ["doing"]
    assert asyncio.run(sweep(0)) == 1
    assert _job_status(postgres_url, queue_schema) == ["todo"]
    service = AnalysisService(settings, pipeline=pipeline)
    WorkQueue(settings, handler=service.run_job).run_worker(burst=True)
    assert _job_status(postgres_url, queue_schema) == ["succeeded"]
    assert service.analyses.get_answer(fhir_url, ids[0]) is not None  # hooks can answer now


def test_worker_without_a_queue_says_so_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MMCDS_DATABASE_URL", f"sqlite:///{tmp_path / 'solo.db'}")
    monkeypatch.delenv("MMCDS_QUEUE_URL", raising=False)
    get_settings.cache_clear()
    try:
        done = CliRunner().invoke(cli, ["worker"])
    finally:
        get_settings.cache_clear()
    assert done.exit_code == 1
    assert "no work queue: set MMCDS_QUEUE_URL" in done.output
