"""Durable write-back: a report for a FHIR server that is down lands once the server is back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mmcds.dev.servers import FhirSandbox, free_port
from mmcds.fhir.client import FhirClient
from mmcds.fhir.writeback import send_bundle
from mmcds.service.outbox import Outbox


class Clock:
    """A clock the test moves, so backoff is checked without sleeping."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _bundle(key: str) -> dict[str, Any]:
    report = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": "urn:mmcds:analysis", "value": key}],
        "status": "preliminary",
        "code": {"text": "AI diagnosis-support summary (preliminary)"},
        "conclusion": "test",
    }
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:7f0e1b6c-3a59-4bb9-9d0e-2d7a4f0c9e11",
                "resource": report,
                "request": {
                    "method": "POST",
                    "url": "DiagnosticReport",
                    "ifNoneExist": f"identifier=urn:mmcds:analysis|{key}",
                },
            }
        ],
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'outbox.db'}"
    url = request.getfixturevalue("postgres_url")
    outbox = Outbox(url)
    with outbox.engine.begin() as conn:
        conn.execute(outbox.table.delete())
    outbox.close()
    return url


def test_report_is_kept_across_restarts_and_lands_when_the_server_returns(database: str) -> None:
    port = free_port()
    fhir_server = f"http://127.0.0.1:{port}/fhir/R4"  # nothing listens there yet
    clock = Clock()
    outbox = Outbox(database, clock=clock)
    outbox.enqueue("k1", fhir_server, _bundle("k1"))

    (first,) = outbox.deliver(send_bundle)
    assert first.status == "pending" and first.attempts == 1
    assert "unreachable" in (first.last_error or "")
    assert outbox.deliver(send_bundle) == []  # not due yet: backoff holds
    outbox.close()

    # The service restarts: a new Outbox on the same database still has the report.
    clock.now += 60
    outbox = Outbox(database, clock=clock)
    assert outbox.pending() == 1
    with FhirSandbox(port=port) as sandbox:
        (landed,) = outbox.deliver(send_bundle)
        assert landed.status == "delivered" and landed.report_id
        with FhirClient(sandbox.base_url) as fhir:
            (report,) = fhir.search("DiagnosticReport", {"identifier": "urn:mmcds:analysis|k1"})
        assert report["id"] == landed.report_id
    assert outbox.pending() == 0
    outbox.close()


def test_resending_the_same_analysis_creates_one_report(database: str, fhir_url: str) -> None:
    outbox = Outbox(database)
    outbox.enqueue("k2", fhir_url, _bundle("k2"))
    outbox.enqueue("k2", fhir_url, _bundle("k2"))  # same analysis queued twice: kept once
    assert outbox.pending() == 1
    outbox.deliver(send_bundle)
    # A resend after a lost response must not duplicate the report (ifNoneExist).
    assert send_bundle(fhir_url, _bundle("k2"))
    with FhirClient(fhir_url) as fhir:
        reports = fhir.search("DiagnosticReport", {"identifier": "urn:mmcds:analysis|k2"})
    assert len(reports) == 1
    outbox.close()


def test_a_bundle_the_server_refuses_is_kept_as_rejected_not_retried(
    database: str, fhir_url: str
) -> None:
    outbox = Outbox(database)
    bad = _bundle("k3")
    bad["entry"][0]["resource"]["notAnElement"] = True  # the sandbox validates structure
    outbox.enqueue("k3", fhir_url, bad)
    (result,) = outbox.deliver(send_bundle)
    assert result.status == "rejected" and "400" in (result.last_error or "")
    assert outbox.pending() == 0
    outbox.close()


def test_outbox_command_lists_and_re_drives(
    fhir_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from mmcds.cli import app
    from mmcds.settings import get_settings

    database = f"sqlite:///{tmp_path / 'cli.db'}"
    outbox = Outbox(database, max_attempts=1)
    outbox.enqueue("k4", fhir_url.replace("/fhir/R4", "/nothing-here/fhir/R4"), _bundle("k4"))
    outbox.enqueue("k5", f"http://127.0.0.1:{free_port()}/fhir/R4", _bundle("k5"))
    outbox.deliver(send_bundle)  # k4: a 404 -> rejected; k5: down, one attempt -> dead
    assert {d.key: d.status for d in outbox.deliveries()} == {"k4": "rejected", "k5": "dead"}
    # The operator fixes the cause (here: the server comes back at k5's address) ...
    with outbox.engine.begin() as conn:
        conn.execute(
            outbox.table.update().where(outbox.table.c.key == "k5").values(fhir_server=fhir_url)
        )
    monkeypatch.setenv("MMCDS_DATABASE_URL", database)
    monkeypatch.setenv("MMCDS_HOME", str(tmp_path))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        listed = runner.invoke(app, ["outbox"])
        assert listed.exit_code == 0, listed.output
        assert "rejected: 1" in listed.output and "dead: 1" in listed.output
        assert "404" in listed.output  # the server's reason, for the operator
        retried = runner.invoke(app, ["outbox", "--retry", "k5", "--state", "delivered"])
        assert retried.exit_code == 0, retried.output
        assert "k5  delivered" in retried.output and "DiagnosticReport/" in retried.output
        assert runner.invoke(app, ["outbox", "--retry", "k4"]).exit_code == 1  # still refused
    finally:
        get_settings.cache_clear()
    outbox.close()
