"""Operating the service: /metrics after real hooks, /readyz, JSON logs free of PHI and tokens,
graceful shutdown that lets an in-flight hook finish. Real FHIR sandbox, Orthanc, models."""

from __future__ import annotations

import base64
import io
import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from joserfc.jwk import ECKey
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from mmcds.dev.servers import free_port
from mmcds.fhir.client import FhirClient
from mmcds.fhir.dicomweb import DicomWebClient
from mmcds.fhir.load import load_folder
from mmcds.findings import SYNTH_FINDINGS
from mmcds.fusion.pipeline import Pipeline
from mmcds.service.api import create_app
from mmcds.service.auth import sign_hook_jwt
from mmcds.service.health import add_readiness_check
from mmcds.settings import Settings
from mmcds.synth import generate_cohort

ISSUER = "https://ehr.ops-test.mmcds.local"
KID = "ops-key"
SERVICE = "mmcds-patient-view"


@pytest.fixture(scope="module")
def key() -> ECKey:
    return ECKey.generate_key("P-384", parameters={"kid": KID})


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Pipeline]:
    root = tmp_path_factory.mktemp("ops-models")
    settings = Settings(model_dir=root, database_url=f"sqlite:///{root / 'cache.db'}")
    return root, Pipeline.from_settings(settings)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ops-cohort")
    generate_cohort(out, patients=2, seed=23)
    return out


@pytest.fixture
def loaded(cohort: Path, fhir_url: str, dicomweb: Any) -> list[dict[str, Any]]:
    """The cohort on the sandbox and Orthanc; returns the Patient resources."""
    with (
        FhirClient(fhir_url, timeout=120) as fhir,
        DicomWebClient(dicomweb.dicomweb_url, auth=dicomweb.auth) as pacs,
    ):
        result = load_folder(cohort, fhir, pacs)
        assert not result.errors, result.errors
        return fhir.search("Patient", {"_count": "50"})


def _settings(key: ECKey, base: str, fhir_url: str, pacs: Any, tmp: Path, **kw: Any) -> Settings:
    user, password = pacs.auth
    values: dict[str, Any] = {
        "public_base_url": base,
        "fhir_allowlist": [fhir_url],
        "fhir_base_url": fhir_url,
        "dicomweb_url": pacs.dicomweb_url,
        "dicomweb_user": user,
        "dicomweb_password": password,
        "trusted_issuers": {ISSUER: json.dumps({"keys": [key.as_dict(private=False)]})},
        "database_url": f"sqlite:///{tmp / 'service.db'}",
        # the analysis runs inside the hook, so its metrics and logs are this test's to read
        "hook_answer": "inline",
    }
    return Settings(**(values | kw))


def _hook_body(fhir_url: str, patient_id: str, token: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "hookInstance": "5f0c54a2-5b7c-4b7e-9b0e-2a7d1c3e4f50",
        "hook": "patient-view",
        "fhirServer": fhir_url,
        "context": {"patientId": patient_id, "userId": "Practitioner/ops"},
    }
    if token:
        body["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer"}
    return body


def _auth(key: ECKey, base: str) -> dict[str, str]:
    jwt = sign_hook_jwt(key, issuer=ISSUER, audience=f"{base}/cds-services/{SERVICE}", kid=KID)
    return {"Authorization": f"Bearer {jwt}"}


def _scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_hooks(
    key: ECKey, models: tuple[Path, Pipeline], loaded: list[dict[str, Any]], fhir_url: str,
    dicomweb: Any, tmp_path: Path,
) -> None:  # fmt: skip
    base = "http://testserver"
    settings = _settings(key, base, fhir_url, dicomweb, tmp_path)
    patient = loaded[0]["id"]
    with TestClient(create_app(settings, models[1])) as client:
        before = _scrape(client)
        first = client.post(
            f"/cds-services/{SERVICE}", json=_hook_body(fhir_url, patient), headers=_auth(key, base)
        )
        assert first.status_code == 200, first.text
        middle = _scrape(client)
        second = client.post(
            f"/cds-services/{SERVICE}", json=_hook_body(fhir_url, patient), headers=_auth(key, base)
        )
        assert second.status_code == 200
        refused = client.post(f"/cds-services/{SERVICE}", json=_hook_body(fhir_url, patient))
        assert refused.status_code == 401
        forbidden = client.post(
            f"/cds-services/{SERVICE}",
            json=_hook_body("http://169.254.169.254/fhir", patient),
            headers=_auth(key, base),
        )
        assert forbidden.status_code == 403
        unknown = client.post("/cds-services/no-such-service", json={}, headers=_auth(key, base))
        assert unknown.status_code == 404
        after = _scrape(client)

    def moved(name: str, start: dict[Any, float], end: dict[Any, float], **labels: str) -> float:
        return _value(end, name, **labels) - _value(start, name, **labels)

    hooks = "mmcds_hook_responses_total"
    assert moved(hooks, before, after, service=SERVICE, code="200") == 2
    assert moved(hooks, before, after, service=SERVICE, code="401") == 1
    assert moved(hooks, before, after, service=SERVICE, code="403") == 1
    assert moved(hooks, before, after, service="unknown", code="404") == 1  # id not a label
    assert moved("mmcds_hook_duration_seconds_count", before, after, service=SERVICE) == 4
    assert moved("mmcds_hook_duration_seconds_sum", before, after, service=SERVICE) > 0
    assert _value(after, "mmcds_hooks_in_flight") == 0
    # A fresh cache: the first hook misses on every input, the second finds the same ones.
    lookups = "mmcds_embedding_cache_lookups_total"
    misses = moved(lookups, before, middle, result="miss")
    assert misses > 0 and moved(lookups, before, middle, result="hit") == 0
    assert moved(lookups, middle, after, result="hit") == misses
    assert moved(lookups, middle, after, result="miss") == 0
    # Each card shows every finding once; an untrained model never alarms.
    outcomes = "mmcds_finding_outcomes_total"
    for finding in SYNTH_FINDINGS:
        shown = sum(
            moved(outcomes, before, after, finding=finding, outcome=o)
            for o in ("info", "warning", "critical", "abstained", "not_validated")
            + ("insufficient_inputs",)
        )
        assert shown == 2, finding
        assert moved(outcomes, before, after, finding=finding, outcome="warning") == 0
        assert moved(outcomes, before, after, finding=finding, outcome="critical") == 0
    # The same analysis twice is one report in the outbox, delivered.
    assert _value(after, "mmcds_outbox_reports_by_state", state="delivered") == 1
    assert _value(after, "mmcds_outbox_reports_by_state", state="pending") == 0
    assert ("mmcds_outbox_reports_by_state", (("state", "rejected"),)) in after


def test_readyz_loads_the_models_and_checks_the_fhir_server(
    key: ECKey, models: tuple[Path, Pipeline], fhir_url: str, dicomweb: Any, tmp_path: Path
) -> None:
    model_dir = models[0]  # the tiny checkpoints already built there: loading takes seconds
    settings = _settings(
        key, "http://testserver", fhir_url, dicomweb, tmp_path, model_dir=model_dir
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        first = client.get("/readyz")
        assert first.status_code == 503
        assert first.json()["checks"]["models"] == "loading models"
        assert first.json()["checks"]["database"] == "ok"
        deadline = time.monotonic() + 120
        while (ready := client.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, ready.json()
            time.sleep(0.5)
        assert ready.json() == {
            "status": "ready",
            "checks": {"database": "ok", "models": "ok", "fhir": "ok"},
        }
        # Another part (the queue) makes readiness depend on it.
        add_readiness_check(client.app, "queue", lambda: "queue unreachable")  # type: ignore[arg-type]
        refused = client.get("/readyz")
        assert (
            refused.status_code == 503 and refused.json()["checks"]["queue"] == "queue unreachable"
        )

    dead = f"http://127.0.0.1:{free_port()}/fhir/R4"
    settings = _settings(
        key, "http://testserver", dead, dicomweb, tmp_path / "x", model_dir=model_dir
    )
    (tmp_path / "x").mkdir()
    with TestClient(create_app(settings, models[1])) as client:
        down = client.get("/readyz")
        assert down.status_code == 503
        assert down.json()["checks"]["fhir"].startswith("FHIR server unreachable")
        assert down.json()["checks"]["models"] == "ok"
        assert client.get("/healthz").status_code == 200  # alive, just not ready


def _phi(patient: dict[str, Any], fhir_url: str) -> list[str]:
    """Names, identifiers and note sentences of a patient, as the FHIR server holds them."""
    values: list[str] = [patient["id"]]  # the server's id is an identifier too
    for name in patient.get("name", []):
        values += [*name.get("given", []), name.get("family", "")]
    values += [i["value"] for i in patient.get("identifier", []) if i.get("value")]
    with FhirClient(fhir_url) as fhir:
        for doc in fhir.search("DocumentReference", {"subject": f"Patient/{patient['id']}"}):
            for content in doc.get("content", []):
                data = content.get("attachment", {}).get("data")
                if data:
                    text = base64.b64decode(data).decode("utf-8", "replace")
                    values += [s.strip() for s in text.split(".") if len(s.strip()) >= 25]
    return [v for v in values if len(v) >= 4]


def test_logs_are_json_with_request_ids_and_carry_no_phi_or_token(
    key: ECKey,
    models: tuple[Path, Pipeline],
    loaded: list[dict[str, Any]],
    fhir_url: str,
    dicomweb: Any,
    tmp_path: Path,
    captured_logs: io.StringIO,
) -> None:
    base = "http://testserver"
    settings = _settings(key, base, fhir_url, dicomweb, tmp_path)
    patient = loaded[1]
    access_token = "ehr-access-" + secrets.token_urlsafe(24)
    headers = _auth(key, base)
    jwt = headers["Authorization"].split()[1]
    request_id = "ops-test-" + secrets.token_hex(8)
    with TestClient(create_app(settings, models[1])) as client:
        response = client.post(
            f"/cds-services/{SERVICE}",
            json=_hook_body(fhir_url, patient["id"], token=access_token),
            headers=headers | {"X-Request-ID": request_id},
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == request_id
        # A refused token is logged as refused, never as itself.
        assert (
            client.post(
                f"/cds-services/{SERVICE}",
                json=_hook_body(fhir_url, patient["id"]),
                headers=headers,
            ).status_code
            == 401
        )  # replayed jti

    lines = [json.loads(line) for line in captured_logs.getvalue().splitlines() if line]
    assert lines, "nothing was logged"
    assert {"ts", "level", "logger", "message"} <= set(lines[0])
    mine = [line for line in lines if line.get("request_id") == request_id]
    assert any(line["logger"] == "mmcds.service.api" for line in mine), lines
    text = captured_logs.getvalue()
    secrets_seen = [s for s in (access_token, jwt, jwt.split(".")[2]) if s in text]
    assert not secrets_seen, "a token reached the log"
    phi = _phi(patient, fhir_url)
    assert len(phi) >= 4, phi  # names, identifier and note sentences were found to look for
    leaked = [v for v in phi if v in text]
    assert not leaked, f"PHI in the log: {leaked[:3]}"


def test_shutdown_lets_an_in_flight_hook_finish(
    key: ECKey, models: tuple[Path, Pipeline], loaded: list[dict[str, Any]], fhir_url: str,
    dicomweb: Any, tmp_path: Path,
) -> None:  # fmt: skip
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = _settings(key, base, fhir_url, dicomweb, tmp_path)
    config = uvicorn.Config(
        create_app(settings, models[1]), port=port, log_config=None, timeout_graceful_shutdown=60
    )
    server = uvicorn.Server(config)
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and serving.is_alive()
        time.sleep(0.05)
    outcome: dict[str, Any] = {}

    def call() -> None:
        outcome["response"] = httpx.post(
            f"{base}/cds-services/{SERVICE}",
            json=_hook_body(fhir_url, loaded[0]["id"]),
            headers=_auth(key, base),
            timeout=120,
        )

    caller = threading.Thread(target=call)
    caller.start()
    while not REGISTRY.get_sample_value("mmcds_hooks_in_flight"):
        assert time.monotonic() < deadline and caller.is_alive(), outcome
        time.sleep(0.005)
    server.should_exit = True  # what uvicorn does on SIGTERM
    caller.join(timeout=120)
    serving.join(timeout=120)
    assert not serving.is_alive()
    response = outcome["response"]
    assert response.status_code == 200 and response.json()["cards"], response.text
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz", timeout=2)
