"""Fixtures of the service tests: the EHR's signing key, the models, a cohort, and an EHR that
signs JWTs and calls the service (hooks and feedback) on a real FHIR sandbox and Orthanc."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from joserfc.jwk import ECKey
from stall import Schema

from mmcds.dev.servers import free_port
from mmcds.fhir.client import FhirClient
from mmcds.fhir.dicomweb import DicomWebClient
from mmcds.fhir.load import load_folder
from mmcds.fusion.pipeline import Pipeline
from mmcds.service.api import create_app
from mmcds.service.auth import sign_hook_jwt
from mmcds.service.logs import configure_logging
from mmcds.settings import Settings
from mmcds.synth import generate_cohort

ISSUER = "https://ehr.test.mmcds.local"
KID = "test-key-1"
BASE = "http://testserver"


@pytest.fixture(scope="session")
def ehr_key() -> ECKey:
    return ECKey.generate_key("P-384", parameters={"kid": KID})


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    root = tmp_path_factory.mktemp("models")
    settings = Settings(model_dir=root, database_url=f"sqlite:///{root / 'cache.db'}")
    return Pipeline.from_settings(settings)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, patients=2, seed=11)
    return out


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(ehr_key: ECKey, tmp_path: Path) -> SettingsFactory:
    """Settings trusting the EHR's key; ``fhir_urls`` are allow-listed (the first is the
    default FHIR server); ``pacs`` an ``OrthancPacs`` or None; overrides as keywords."""

    def make(fhir_urls: list[str], pacs: Any = None, **overrides: Any) -> Settings:
        jwks = json.dumps({"keys": [ehr_key.as_dict(private=False)]})
        values: dict[str, Any] = {
            "public_base_url": BASE,
            "fhir_allowlist": fhir_urls,
            "fhir_base_url": fhir_urls[0],
            "trusted_issuers": {ISSUER: jwks},
            "database_url": f"sqlite:///{tmp_path / 'service.db'}",
            "model_dir": tmp_path / "models",
            "fhir_timeout_s": 2.0,
            # These tests are about the hook protocol and the analysis path it runs; the
            # stored-answer fast path has its own tests (test_fast_path.py).
            "hook_answer": "inline",
        }
        if pacs is not None:
            user, password = pacs.auth
            values |= {
                "dicomweb_url": pacs.dicomweb_url,
                "dicomweb_user": user,
                "dicomweb_password": password,
            }
        return Settings(**(values | overrides))

    return make


@dataclass
class HookCaller:
    """An EHR's side of the conversation: signs a JWT for the exact endpoint and posts."""

    client: TestClient
    key: ECKey
    dead_fhir: str  # an allow-listed FHIR URL where nothing listens

    def token(self, path: str) -> str:
        return sign_hook_jwt(self.key, issuer=ISSUER, audience=f"{BASE}{path}", kid=KID)

    def __call__(
        self, body: dict[str, Any], *, service: str = "mmcds-patient-view", token: str | None = None
    ) -> Any:
        return self.post(f"/cds-services/{service}", body, token=token)

    def post(self, path: str, body: dict[str, Any], *, token: str | None = None) -> Any:
        token = token or self.token(path)
        return self.client.post(path, json=body, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def call_hook(
    make_settings: SettingsFactory,
    ehr_key: ECKey,
    pipeline: Pipeline,
    fhir_url: str,
    dicomweb: Any,
) -> Iterator[HookCaller]:
    """The service on the sandbox and Orthanc, plus an allow-listed FHIR URL that is down."""
    dead_fhir = f"http://127.0.0.1:{free_port()}/fhir/R4"
    settings = make_settings([fhir_url, dead_fhir], dicomweb)
    with TestClient(create_app(settings, pipeline)) as client:
        yield HookCaller(client, ehr_key, dead_fhir)


@pytest.fixture
def load_cohort(cohort: Path, fhir_url: str, dicomweb: Any) -> Callable[[Path | None], list[str]]:
    """Load a folder (default: the cohort) into the sandbox and PACS; the patients' ids."""

    def load(folder: Path | None = None) -> list[str]:
        with (
            FhirClient(fhir_url, timeout=120) as fhir,
            DicomWebClient(dicomweb.dicomweb_url, auth=dicomweb.auth) as dicom,
        ):
            result = load_folder(folder or cohort, fhir, dicom)
            assert not result.errors, result.errors
            return [p["id"] for p in fhir.search("Patient", {"_count": "50"})]

    return load


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Everything the service logs, as production writes it (JSON, INFO; mmcds at DEBUG)."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    logging.getLogger("mmcds").setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        logging.getLogger("mmcds").setLevel(logging.NOTSET)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


@pytest.fixture
def pg_schema(postgres_url: str) -> Iterator[Schema]:
    """A schema of this test's own in the test database, dropped after it."""
    schema = Schema(f"mmcds_t{uuid.uuid4().hex[:12]}", postgres_url)
    with psycopg.connect(schema.conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema.name}"')
    yield schema
    with psycopg.connect(schema.conninfo, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema.name}" CASCADE')


@pytest.fixture
def queue_schema(postgres_url: str) -> Iterator[str]:
    """A queue schema of this test's own (the test database is shared by parallel runs)."""
    schema = f"mmcds_queue_t{uuid.uuid4().hex[:12]}"
    yield schema
    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
