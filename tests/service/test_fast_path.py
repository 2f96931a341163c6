"""Answer fast, always: hooks answer from stored analyses, misses queue work (real sandbox, real
Orthanc, real PostgreSQL queue, real procrastinate workers, real uvicorn for notifications)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from joserfc.jwk import ECKey
from stall import Schema, Stalled, while_locked

from mmcds.dev.demo import running_service
from mmcds.dev.servers import FhirSandbox, free_port
from mmcds.fhir.client import FhirClient
from mmcds.fhir.dicomweb import DicomWebClient
from mmcds.fhir.load import load_folder
from mmcds.fusion.pipeline import Pipeline
from mmcds.service.analysis import AnalysisService
from mmcds.service.analysis_store import AnalysisStore, StoredAnswer
from mmcds.service.api import create_app
from mmcds.service.auth import sign_hook_jwt
from mmcds.service.fast_path import AnswerCache, FastAnswer, FastPath
from mmcds.service.queue import WorkQueue
from mmcds.settings import Settings
from mmcds.synth import generate_cohort

ISSUER = "https://ehr.fast.mmcds.local"
KID = "fast-key-1"
SECRET = "notify-" + uuid.uuid4().hex
IN_PROGRESS = "AI risk summary: analysis in progress"


@pytest.fixture(scope="module")
def key() -> ECKey:
    return ECKey.generate_key("P-384", parameters={"kid": KID})


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    root = tmp_path_factory.mktemp("fast-models")
    return Pipeline.from_settings(Settings(model_dir=root, database_url=f"sqlite:///{root}/c.db"))


@pytest.fixture(scope="module")
def two_patients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fast-cohort")
    generate_cohort(out, patients=2, seed=5)
    return out


@dataclass
class Setup:
    settings: Settings
    fhir_url: str
    patient_ids: list[str]
    key: ECKey

    def hook(
        self,
        post: Callable[..., Any],
        patient_id: str,
        fhir: str | None = None,
        prefetch: dict[str, Any] | None = None,
    ) -> Any:
        endpoint = f"{self.settings.public_base_url}/cds-services/mmcds-patient-view"
        token = sign_hook_jwt(self.key, issuer=ISSUER, audience=endpoint, kid=KID)
        body: dict[str, Any] = {
            "hookInstance": str(uuid.uuid4()),
            "hook": "patient-view",
            "fhirServer": fhir or self.fhir_url,
            "context": {"userId": "Practitioner/t", "patientId": patient_id},
        }
        if prefetch is not None:
            body["prefetch"] = prefetch
        return post(
            "/cds-services/mmcds-patient-view",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        )


@pytest.fixture
def setup(
    key: ECKey,
    two_patients: Path,
    fhir_url: str,
    dicomweb: Any,
    postgres_url: str,
    queue_schema: str,
    tmp_path: Path,
) -> Setup:
    with (
        FhirClient(fhir_url, timeout=120) as fhir,
        DicomWebClient(dicomweb.dicomweb_url, auth=dicomweb.auth) as pacs,
    ):
        assert not load_folder(two_patients, fhir, pacs).errors
        ids = [p["id"] for p in fhir.search("Patient", {"_count": "10"})]
    port = free_port()
    hanging = f"http://127.0.0.1:{free_port()}/fhir/R4"  # FaultyFhir listens here when used
    settings = Settings(
        public_base_url=f"http://127.0.0.1:{port}",
        port=port,
        fhir_allowlist=[fhir_url, hanging],
        fhir_base_url=fhir_url,
        dicomweb_url=dicomweb.dicomweb_url,
        dicomweb_user=dicomweb.auth[0],
        dicomweb_password=dicomweb.auth[1],
        trusted_issuers={ISSUER: json.dumps({"keys": [key.as_dict(private=False)]})},
        database_url=f"sqlite:///{tmp_path / 'service.db'}",
        queue_url=postgres_url,
        queue_schema=queue_schema,
        notify_secret=SECRET,
    )
    return Setup(settings, fhir_url, ids, key)


class EncodeCounter:
    """Counts calls of the real ``Pipeline.encode`` (a spy: the real method still runs)."""

    def __init__(self, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = pipeline.encode

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(pipeline, "encode", counted)


def _worker(settings: Settings, service: AnalysisService) -> WorkQueue:
    """A worker of its own (own procrastinate app and pool), as `mmcds worker` runs one."""
    return WorkQueue(settings, handler=service.run_job)


def _until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Wait for work done in the background (a loaded machine may run over the hook budget, and
    the enqueue then completes after the answer)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


def _todo(service: AnalysisService) -> int:
    assert service.queue is not None
    return service.queue.counts().get("todo", 0)


def _add_lab(fhir_url: str, patient_id: str) -> None:
    lab = {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": "1988-5"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": "2026-12-01T10:00:00Z",
        "valueQuantity": {"value": 48.0, "unit": "mg/L", "system": "http://unitsofmeasure.org"},
    }
    assert httpx.post(f"{fhir_url}/Observation", json=lab).status_code == 201


def _analysed(service: AnalysisService, fhir_url: str, patient_id: str) -> StoredAnswer:
    """Analyse the patient now, as a worker would; the answer it stored."""
    assert service.ingest(fhir_url, [patient_id], now=True) == ["analysed"]
    stored = service.analyses.get_answer(fhir_url, patient_id)
    assert stored is not None
    return stored


def _stored_view(card: dict[str, Any]) -> dict[str, Any]:
    """A hook's card as stored: the hook adds a fresh, expiring review link to each answer."""
    return {k: v for k, v in card.items() if k != "links"}


def test_ingest_then_hook_answers_from_store_without_encoding(
    setup: Setup, models: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    encodes = EncodeCounter(models, monkeypatch)
    app = create_app(setup.settings, models)
    with TestClient(app) as client:
        service: AnalysisService = app.state.analysis
        assert service.ingest(setup.fhir_url, setup.patient_ids) == ["queued", "queued"]
        assert service.ingest(setup.fhir_url, setup.patient_ids) == ["waiting", "waiting"]
        assert encodes.calls == 0  # ingest only queues
        _worker(setup.settings, service).run_worker(burst=True)
        assert encodes.calls == 2
        assert service.queue is not None and service.queue.counts() == {"succeeded": 2}

        for patient_id in setup.patient_ids:
            response = setup.hook(client.post, patient_id)
            assert response.status_code == 200, response.text
            (card,) = response.json()["cards"]
            stored = service.analyses.get_answer(setup.fhir_url, patient_id)
            assert stored is not None and _stored_view(card) == stored.cards[0]
            assert "UNTRAINED" in card["summary"]
        assert encodes.calls == 2  # the hooks encoded nothing
        assert service.queue.counts() == {"succeeded": 2}  # and queued nothing


def test_changed_data_is_stale_and_requeued(
    setup: Setup, models: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(setup.settings, models)
    patient = setup.patient_ids[0]
    with TestClient(app) as client:
        service: AnalysisService = app.state.analysis
        before = _analysed(service, setup.fhir_url, patient)
        encodes = EncodeCounter(models, monkeypatch)

        _add_lab(setup.fhir_url, patient)  # new data on the FHIR server
        (card,) = setup.hook(client.post, patient).json()["cards"]
        assert card["summary"] == IN_PROGRESS
        assert service.queue is not None
        _until(lambda: _todo(service) == 1)
        assert encodes.calls == 0

        _worker(setup.settings, service).run_worker(burst=True)
        after = service.analyses.get_answer(setup.fhir_url, patient)
        assert after is not None and after.fingerprint != before.fingerprint
        assert after.analysis_id != before.analysis_id  # a new analysis of the new inputs
        (card,) = setup.hook(client.post, patient).json()["cards"]
        assert _stored_view(card) == after.cards[0] and encodes.calls == 1


def test_subscription_notification_queues_a_job_that_stores_the_analysis(
    setup: Setup, models: Pipeline
) -> None:
    patient = setup.patient_ids[1]
    app = create_app(setup.settings, models)
    with running_service(setup.settings, app=app) as url, httpx.Client(base_url=url) as http:
        service: AnalysisService = app.state.analysis
        assert service.queue is not None
        refused = http.post("/fhir-notify", json={}, headers={"Authorization": "Bearer wrong"})
        assert refused.status_code == 401
        subscription = {
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "mmcds: analyse patients when their data changes",
            "criteria": "Observation?category=laboratory",
            "channel": {
                "type": "rest-hook",
                "endpoint": f"{url}/fhir-notify",
                "payload": "application/fhir+json",
                "header": [f"Authorization: Bearer {SECRET}"],
            },
        }
        assert httpx.post(f"{setup.fhir_url}/Subscription", json=subscription).status_code == 201
        _add_lab(setup.fhir_url, patient)  # the sandbox notifies the service
        _until(lambda: _todo(service) == 1)  # the notification queued it

        _worker(setup.settings, service).run_worker(burst=True)

        assert service.queue.counts() == {"succeeded": 1}
        stored = service.analyses.get_answer(setup.fhir_url, patient)
        assert stored is not None and "UNTRAINED" in stored.cards[0]["summary"]
        (card,) = setup.hook(http.post, patient).json()["cards"]
        assert _stored_view(card) == stored.cards[0]
        with FhirClient(setup.fhir_url) as fhir:  # the worker wrote the report back
            reports = fhir.search("DiagnosticReport", {"subject": f"Patient/{patient}"})
        assert len(reports) == 1


@contextlib.contextmanager
def faulty_hanging_fhir(url: str) -> Iterator[None]:
    """FaultyHangingFhir: accepts connections and never answers (a real server cannot be made
    to hang on demand)."""
    port = int(url.split(":")[2].split("/")[0])
    server = socket.create_server(("127.0.0.1", port))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_a_miss_answers_at_once_with_the_in_progress_card(setup: Setup, models: Pipeline) -> None:
    app = create_app(setup.settings, models)
    with TestClient(app) as client:
        service: AnalysisService = app.state.analysis
        assert service.queue is not None
        (card,) = setup.hook(client.post, setup.patient_ids[0]).json()["cards"]
        assert card["summary"] == IN_PROGRESS and card["indicator"] == "info"
        assert "queued" in card["detail"]
        _until(lambda: _todo(service) == 1)  # the hook queued the work
        assert service.analyses.get_answer(setup.fhir_url, setup.patient_ids[0]) is None

        # A FHIR server that never answers: the budget, not the 10 s FHIR timeout, bounds it.
        hanging = setup.settings.fhir_allowlist[1]
        with faulty_hanging_fhir(hanging):
            started = time.perf_counter()
            response = setup.hook(client.post, "p1", fhir=hanging)
            elapsed = time.perf_counter() - started
        (card,) = response.json()["cards"]
        assert card["summary"] == IN_PROGRESS and "within the time allowed" in card["detail"]
        assert elapsed < setup.settings.hook_budget_ms / 1000 + 2.0  # far below the FHIR timeout

        # Over budget with an earlier answer in hand: that answer, said to be unconfirmed.
        earlier = StoredAnswer(hanging, "p2", "a" * 64, "f" * 64, [dict(card, summary="Earlier")])
        service.analyses.put_answer(earlier)
        service.answers.remember(earlier)
        with faulty_hanging_fhir(hanging):
            (card,) = setup.hook(client.post, "p2", fhir=hanging).json()["cards"]
        assert card["summary"] == "Earlier" and "Not confirmed current" in card["detail"]


def _prefetched(templates: dict[str, str], fhir_url: str, patient_id: str) -> dict[str, Any]:
    """What an EHR sends for these prefetch templates: each run on its FHIR server."""
    return {
        key: httpx.get(f"{fhir_url}/{t.replace('{{context.patientId}}', patient_id)}").json()
        for key, t in templates.items()
    }


def test_a_prefetch_with_the_fingerprint_answers_without_any_fhir_request(
    setup: Setup, models: Pipeline, fhir_sandbox: FhirSandbox
) -> None:
    """The prefetch is the EHR's view of the patient's data at the hook (CDS Hooks 2.0
    §Prefetch): when it shows the inputs a stored answer was computed from, that answer is
    current without asking the FHIR server; when not, the server is asked as without it."""
    app = create_app(setup.settings, models)
    patient = setup.patient_ids[0]
    with TestClient(app) as client:
        service: AnalysisService = app.state.analysis
        stored = _analysed(service, setup.fhir_url, patient)
        (described,) = [
            s for s in client.get("/cds-services").json()["services"] if s["hook"] == "patient-view"
        ]
        templates = {k: t for k, t in described["prefetch"].items() if k.startswith("newest")}
        assert len(templates) == 4  # Patient, notes, labs and vitals, imaging studies

        fhir_sandbox.reset_log()
        prefetch = _prefetched(templates, setup.fhir_url, patient)
        fhir_sandbox.reset_log()
        cards = setup.hook(client.post, patient, prefetch=prefetch).json()["cards"]
        assert [_stored_view(c) for c in cards] == stored.cards
        assert fhir_sandbox.requests() == []  # current, and the FHIR server was not asked

        # A key the EHR could not prefetch: the service asks the server (one batch) instead.
        failed = {**prefetch, "newestObservation": None}
        cards = setup.hook(client.post, patient, prefetch=failed).json()["cards"]
        assert [_stored_view(c) for c in cards] == stored.cards
        assert [r["method"] for r in fhir_sandbox.requests()] == ["POST"]

        # New data, prefetched: the fingerprint differs, the FHIR server confirms it changed.
        _add_lab(setup.fhir_url, patient)
        changed = _prefetched(templates, setup.fhir_url, patient)
        (card,) = setup.hook(client.post, patient, prefetch=changed).json()["cards"]
        assert card["summary"] == IN_PROGRESS and "changed" in card["detail"]


def test_no_card_on_a_miss_when_so_configured(setup: Setup, models: Pipeline) -> None:
    settings = setup.settings.model_copy(update={"hook_miss": "no-card"})
    with TestClient(create_app(settings, models)) as client:
        assert setup.hook(client.post, setup.patient_ids[0]).json() == {"cards": []}


def test_notification_mode_hooks_trust_the_subscription_marks(
    setup: Setup, models: Pipeline
) -> None:
    settings = setup.settings.model_copy(update={"currency_check": "notifications"})
    app = create_app(settings, models)
    patient = setup.patient_ids[0]
    with TestClient(app) as client:
        service: AnalysisService = app.state.analysis
        stored = _analysed(service, setup.fhir_url, patient)
        cards = setup.hook(client.post, patient).json()["cards"]
        assert [_stored_view(c) for c in cards] == stored.cards

        _add_lab(setup.fhir_url, patient)  # no Subscription told the service: still "current"
        cards = setup.hook(client.post, patient).json()["cards"]
        assert [_stored_view(c) for c in cards] == stored.cards

        lab = {"resourceType": "Observation", "subject": {"reference": f"Patient/{patient}"}}
        notified = client.put(
            "/fhir-notify/Observation/x", json=lab, headers={"Authorization": f"Bearer {SECRET}"}
        )
        assert notified.json() == {"patients": 1, "queued": 1}
        (card,) = setup.hook(client.post, patient).json()["cards"]
        assert card["summary"] == IN_PROGRESS and "changed" in card["detail"]


def test_a_stalled_database_does_not_hold_a_hook_past_its_budget(pg_schema: Schema) -> None:
    """With notifications as the currency check the hook's one I/O is the database read. A
    database server that stalls (here a real PostgreSQL whose answers table another session
    holds locked) must cost the hook its budget, not the stall; the event loop stays free."""
    import asyncio

    store = AnalysisStore(pg_schema.url)
    try:
        fhir = "http://fhir.stall.test/fhir/R4"
        card = {
            "uuid": str(uuid.uuid4()),
            "summary": "AI risk summary: nothing assessed above info",
            "indicator": "info",
            "detail": "Preliminary.",
            "source": {"label": "mmcds"},
        }
        store.put_answer(StoredAnswer(fhir, "p1", "a" * 64, "f", [card]))
        fast = FastPath(
            AnswerCache(store, size=8),
            None,
            budget_ms=300,
            in_progress=lambda state, queued: [],
            timeout_s=5.0,
            trust_notifications=True,
            local_reads=store.dialect == "sqlite",
        )

        async def hooks() -> tuple[FastAnswer, Stalled]:
            before = await fast.answer(fhir, "p1", None)  # read through: now in memory too
            return before, await while_locked(
                pg_schema, "mmcds_answers", lambda: fast.answer(fhir, "p1", None)
            )

        before, stalled = asyncio.run(hooks())
        assert before.state == "current"
        during: FastAnswer = stalled.result
        assert during.state == "over-budget" and during.unverified is not None
        assert during.cards == before.cards  # the last answer, which the card says is unverified
        assert stalled.elapsed_s < 0.3 + 0.2
        assert stalled.loop_ticks >= 10  # the loop ran other work while the read waited
    finally:
        store.engine.dispose()
