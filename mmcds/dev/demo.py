"""``mmcds demo``: the whole path on embedded defaults, as an EHR would drive it.

Starts the FHIR sandbox and Orthanc (unless URLs are given), writes a few synthetic patients,
loads them, starts the service, calls the patient-view hook for each patient with a signed JWT,
prints the cards and the DiagnosticReports written back, and stops everything it started.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import typer
import uvicorn
from fastapi import FastAPI
from joserfc.jwk import ECKey

from mmcds.dev.demo_model import ensure_demo_model
from mmcds.dev.servers import FhirSandbox, OrthancPacs, free_port
from mmcds.fhir.client import FhirClient
from mmcds.fhir.dicomweb import DicomWebClient
from mmcds.fhir.load import load_folder
from mmcds.service.api import create_app
from mmcds.service.auth import sign_hook_jwt
from mmcds.settings import Settings, get_settings
from mmcds.synth import generate_cohort

DEMO_ISSUER = "https://ehr.demo.mmcds.local"
DEMO_KID = "demo-ehr-key-1"


@contextlib.contextmanager
def running_service(settings: Settings, app: FastAPI | None = None) -> Iterator[str]:
    """Serve the app (default: ``create_app(settings)``) with uvicorn in a thread; yields its
    base URL."""
    config = uvicorn.Config(
        app or create_app(settings), host=settings.host, port=settings.port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the service did not start on port {settings.port}")
        time.sleep(0.05)
    try:
        yield f"http://{settings.host}:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def _servers(
    fhir_url: str | None, dicomweb_url: str | None, echo: Callable[[str], None]
) -> Iterator[tuple[str, str, tuple[str, str] | None]]:
    with contextlib.ExitStack() as stack:
        if fhir_url is None:
            sandbox = stack.enter_context(FhirSandbox())
            fhir_url = sandbox.base_url
            echo(f"FHIR sandbox at {fhir_url}")
        auth = None
        if dicomweb_url is None:
            pacs = stack.enter_context(OrthancPacs())
            dicomweb_url, auth = pacs.dicomweb_url, pacs.auth
            echo(f"Orthanc DICOMweb at {dicomweb_url}")
        yield fhir_url, dicomweb_url, auth


def hook_request(fhir_url: str, patient_id: str) -> dict[str, object]:
    return {
        "hookInstance": str(uuid.uuid4()),
        "hook": "patient-view",
        "fhirServer": fhir_url,
        "context": {"userId": "Practitioner/demo-clinician", "patientId": patient_id},
    }


@dataclass
class DemoService:
    """A running service with loaded patients, and the EHR's key to call it."""

    settings: Settings
    url: str
    fhir_base: str
    patient_ids: list[str]
    key: ECKey

    def call(self, http: httpx.Client, patient_id: str) -> tuple[httpx.Response, float]:
        """One patient-view hook exactly as an EHR sends it; (response, seconds)."""
        endpoint = f"{self.settings.public_base_url}/cds-services/mmcds-patient-view"
        token = sign_hook_jwt(self.key, issuer=DEMO_ISSUER, audience=endpoint, kid=DEMO_KID)
        started = time.perf_counter()
        response = http.post(
            f"{self.url}/cds-services/mmcds-patient-view",
            json=hook_request(self.fhir_base, patient_id),
            headers={"Authorization": f"Bearer {token}"},
        )
        return response, time.perf_counter() - started


@contextlib.contextmanager
def demo_service(
    *,
    patients: int,
    seed: int,
    fhir_url: str | None = None,
    dicomweb_url: str | None = None,
    echo: Callable[[str], None] = typer.echo,
    ingest: bool = True,
) -> Iterator[DemoService]:
    """Servers, a trained model, synthetic patients loaded, the service running."""
    base = get_settings()
    if not base.fusion_model:  # the demo runs a trained model, built once at first run
        base = base.model_copy(update={"fusion_model": str(ensure_demo_model(base, echo))})
    key = ECKey.generate_key("P-384", parameters={"kid": DEMO_KID})
    jwks = json.dumps({"keys": [key.as_dict(private=False)]})
    with (
        tempfile.TemporaryDirectory(prefix="mmcds-demo-") as tmp,
        _servers(fhir_url, dicomweb_url, echo) as (fhir_base, dicomweb, auth),
    ):
        cohort = Path(tmp) / "cohort"
        summary = generate_cohort(cohort, patients=patients, seed=seed)
        echo(f"synthetic cohort: {summary.patients} patients, sites {summary.sites}")
        with (
            FhirClient(fhir_base, timeout=120) as fhir,
            DicomWebClient(dicomweb, auth=auth) as pacs,
        ):
            loaded = load_folder(cohort, fhir, pacs)
            echo(f"loaded {loaded.bundles} bundles, {loaded.dicom} DICOM files")
            if loaded.errors:
                raise RuntimeError("demo data failed to load: " + "; ".join(loaded.errors))
            ids = [p["id"] for p in fhir.search("Patient", {"_count": "100"})]
        port = free_port()
        settings = base.model_copy(
            update={
                "port": port,
                "public_base_url": f"http://127.0.0.1:{port}",
                "fhir_allowlist": [fhir_base],
                "fhir_base_url": fhir_base,
                "dicomweb_url": dicomweb,
                "dicomweb_user": auth[0] if auth else None,
                "dicomweb_password": auth[1] if auth else None,
                "trusted_issuers": {DEMO_ISSUER: jwks},
                "database_url": f"sqlite:///{Path(tmp) / 'service.db'}",
            }
        )
        app = create_app(settings)
        if ingest:  # analyses are computed when data arrives, so hooks answer from them
            started = time.perf_counter()
            app.state.analysis.ingest(fhir_base, ids, now=True)
            echo(f"ingested {len(ids)} patients in {time.perf_counter() - started:.1f} s")
        with running_service(settings, app) as url:
            yield DemoService(settings, url, fhir_base, ids, key)


def run_demo(*, patients: int, seed: int, fhir_url: str | None, dicomweb_url: str | None) -> None:
    with (
        demo_service(
            patients=patients, seed=seed, fhir_url=fhir_url, dicomweb_url=dicomweb_url
        ) as service,
        httpx.Client(timeout=300) as http,
        FhirClient(service.fhir_base) as fhir,
    ):
        for patient_id in service.patient_ids:
            response, elapsed = service.call(http, patient_id)
            response.raise_for_status()
            typer.echo(f"\n=== Patient/{patient_id} (hook answered in {elapsed:.2f} s)")
            for card in response.json()["cards"]:
                typer.echo(f"[{card['indicator']}] {card['summary']}")
                typer.echo(card["detail"])
            reports = fhir.search("DiagnosticReport", {"subject": f"Patient/{patient_id}"})
            typer.echo(
                "DiagnosticReports written back: "
                + ", ".join(f"DiagnosticReport/{r['id']}" for r in reports)
            )
