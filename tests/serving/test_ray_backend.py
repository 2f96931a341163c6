"""The models served by Ray Serve on a local Ray instance give the hook the same answer as the
in-process models. Real Ray (CPU), real FHIR sandbox and Orthanc, the tiny local models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from joserfc.jwk import ECKey

from mmcds.fhir.client import FhirClient
from mmcds.fhir.dicomweb import DicomWebClient
from mmcds.fhir.load import load_folder
from mmcds.fusion.pipeline import Pipeline
from mmcds.service.analysis import AnalysisService
from mmcds.service.api import create_app
from mmcds.service.auth import sign_hook_jwt
from mmcds.service.health import probe_app
from mmcds.settings import Settings
from mmcds.synth import generate_cohort
from mmcds.training.score import score_cohort

ray = pytest.importorskip("ray")  # the optional extra: mmcds[ray]
from mmcds.serving.remote import APP, RemotePipeline, deploy, models_status  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
ISSUER = "https://ehr.ray-test.mmcds.local"
BASE = "http://testserver"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray-models")
    Pipeline.from_settings(Settings(model_dir=root, database_url=f"sqlite:///{root / 'c.db'}"))
    return root  # tiny checkpoints and their ONNX graphs, built once, read by every replica


@pytest.fixture(scope="module")
def ray_models(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A local Ray instance on this machine's 2 cores with the models deployed on it."""
    db = tmp_path_factory.mktemp("ray-db") / "replicas.db"
    settings = Settings(
        model_dir=model_dir, database_url=f"sqlite:///{db}", ray_cpus=0.2, ray_max_replicas=1
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        deploy(settings)
        yield settings
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def _loaded(fhir_url: str, pacs: Any, folder: Path) -> list[str]:
    with (
        FhirClient(fhir_url, timeout=120) as fhir,
        DicomWebClient(pacs.dicomweb_url, auth=pacs.auth) as dicom,
    ):
        assert not load_folder(folder, fhir, dicom).errors
        return [p["id"] for p in fhir.search("Patient", {"_count": "10"})]


def _settings(
    model_dir: Path, db: Path, fhir_url: str, pacs: Any, key: ECKey, **kw: Any
) -> Settings:
    user, password = pacs.auth
    return Settings(
        model_dir=model_dir,
        database_url=f"sqlite:///{db}",
        public_base_url=BASE,
        fhir_allowlist=[fhir_url],
        fhir_base_url=fhir_url,
        dicomweb_url=pacs.dicomweb_url,
        dicomweb_user=user,
        dicomweb_password=password,
        trusted_issuers={ISSUER: json.dumps({"keys": [key.as_dict(private=False)]})},
        **kw,
    )


def _hook(client: TestClient, key: ECKey, fhir_url: str, patient: str) -> list[dict[str, Any]]:
    endpoint = f"{BASE}/cds-services/mmcds-patient-view"
    token = sign_hook_jwt(key, issuer=ISSUER, audience=endpoint, kid="k")
    body = {
        "hook": "patient-view",
        "hookInstance": "0b7d3c1e-2a4f-4c6d-8e9f-1a2b3c4d5e6f",
        "fhirServer": fhir_url,
        "context": {"patientId": patient},
    }
    response = client.post(
        "/cds-services/mmcds-patient-view", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    for card in cards:
        card.pop("uuid")
    return cards


def test_hook_through_ray_serve_equals_the_in_process_models(
    ray_models: Settings,
    model_dir: Path,
    fhir_url: str,
    dicomweb: Any,
    tmp_path: Path,
) -> None:
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, patients=2, seed=31)
    patients = _loaded(fhir_url, dicomweb, cohort)
    key = ECKey.generate_key("P-384", parameters={"kid": "k"})
    local = _settings(model_dir, tmp_path / "local.db", fhir_url, dicomweb, key)
    remote = _settings(
        model_dir, tmp_path / "remote.db", fhir_url, dicomweb, key, model_backend="ray"
    )

    with TestClient(create_app(local)) as client:
        local_cards = [_hook(client, key, fhir_url, p) for p in patients]
    with TestClient(create_app(remote)) as client:
        service: AnalysisService = client.app.state.analysis  # type: ignore[attr-defined]
        remote_cards = [_hook(client, key, fhir_url, p) for p in patients]
        assert isinstance(service.pipeline, RemotePipeline)  # the hooks went through Ray
        assert client.get("/readyz").json()["checks"]["models"] == "ok"

    assert remote_cards == local_cards  # the probabilities: the cohort test below


def test_cohort_scored_with_ray_data_equals_local_scores(
    ray_models: Settings, model_dir: Path, tmp_path: Path
) -> None:
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, patients=4, seed=37)
    local = Settings(model_dir=model_dir, database_url=f"sqlite:///{tmp_path / 'l.db'}")
    remote = ray_models.model_copy(
        update={"database_url": f"sqlite:///{tmp_path / 'r.db'}", "model_backend": "ray"}
    )
    by_local = score_cohort(cohort, tmp_path / "local.jsonl", local, progress=False)
    by_ray = score_cohort(
        cohort, tmp_path / "ray.jsonl", remote, backend="ray", workers=1, batch_size=4,
        progress=False,
    )  # fmt: skip
    assert by_local.scored == by_ray.scored == 4
    rows = {}
    for name in ("local", "ray"):
        lines = (tmp_path / f"{name}.jsonl").read_text().splitlines()
        rows[name] = {r["patient_key"]: r for r in map(json.loads, lines)}
    assert rows["local"].keys() == rows["ray"].keys()
    for key, a in rows["local"].items():
        b = rows["ray"][key]
        assert a["identifier"] == b["identifier"]
        for finding, fa in a["findings"].items():
            fb = b["findings"][finding]
            assert (fa["status"], fa["level"]) == (fb["status"], fb["level"])
            assert fa["probability"] == pytest.approx(fb["probability"], abs=1e-5)


def test_models_probe_is_ready_only_while_the_application_runs(ray_models: Settings) -> None:
    """`mmcds serve-models --health-port`'s /readyz (the Ray models pod's readiness): ready while
    the application runs, 503 naming why once it is gone. Last in the module: it deletes the
    application."""
    from ray import serve

    client = TestClient(probe_app({"models": models_status}, "models probes"))
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"models": "ok"}
    serve.delete(APP)
    gone = client.get("/readyz")
    assert gone.status_code == 503
    assert gone.json()["checks"]["models"] == "models not deployed on Ray Serve"
