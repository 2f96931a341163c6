"""Write-back under faults, against the real FHIR sandbox: a real analysis's report bundle meets a
server that is down, answers 500, answers later than the timeout, refuses the bundle's size, or
outlives the process that sent it (SIGKILL). Each ends, after recovery, with exactly one report
and nothing duplicated; and in every state the card says what is true of it."""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faulty import FaultyProxy, WallClock
from prometheus_client import REGISTRY

from mmcds.dev.fullsize import load_cohort, local_settings
from mmcds.dev.servers import FhirSandbox, OrthancPacs, free_port
from mmcds.fhir.bundle_limits import OMITTED_PREFIX
from mmcds.fhir.client import FhirClient
from mmcds.fhir.writeback import send_bundle
from mmcds.findings import SYNTH_FINDINGS as FINDINGS
from mmcds.fusion.pipeline import Pipeline
from mmcds.service.analysis import AnalysisService, Trigger
from mmcds.service.cards import delivery_note
from mmcds.service.outbox import LEASE_S, Outbox
from mmcds.synth import generate_cohort

TYPES = ("DiagnosticReport", "Observation", "Media", "Binary", "Device", "Provenance")


@pytest.fixture(scope="module")
def analysed(
    tmp_path_factory: pytest.TempPathFactory, fhir_sandbox: FhirSandbox, orthanc: OrthancPacs
) -> dict[str, Any]:
    """One real analysis (tiny models, a synthetic patient with image, notes and labs): its
    report bundle, written to a sandbox that each test then resets."""
    root = tmp_path_factory.mktemp("faults")
    generate_cohort(root / "cohort", patients=1, seed=5)
    fhir_sandbox.reset()
    orthanc.reset()
    (patient_id,) = load_cohort(root / "cohort", fhir_sandbox.base_url, orthanc)
    models = tmp_path_factory.getbasetemp() / "models"
    settings = local_settings(root, fhir_sandbox.base_url, orthanc, models)
    service = AnalysisService(settings, pipeline=Pipeline.from_settings(settings))
    result = service.analyse(Trigger(patient_id, fhir_sandbox.base_url))
    assert result.bundle is not None
    return result.bundle


def counts(fhir_url: str) -> dict[str, int]:
    with FhirClient(fhir_url) as fhir:
        return {
            t: int(fhir._request("GET", t, params={"_summary": "count"}).json()["total"])
            for t in TYPES
        }


def exactly_one_report(fhir_url: str, overlays: int = len(FINDINGS)) -> None:
    assert counts(fhir_url) == {
        "DiagnosticReport": 1,
        "Observation": len(FINDINGS),
        "Media": overlays,
        "Binary": overlays,
        "Device": 1,
        "Provenance": 1,
    }


def reports_total(state: str) -> float:
    return REGISTRY.get_sample_value("mmcds_outbox_reports_total", {"state": state}) or 0.0


def send_with(timeout_s: float = 10.0) -> Any:
    return lambda server, bundle: send_bundle(server, bundle, timeout_s=timeout_s)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'outbox.db'}"


@pytest.fixture
def proxy(fhir_url: str) -> Iterator[FaultyProxy]:
    with FaultyProxy(fhir_url) as p:
        yield p


def test_server_down_during_write_back(analysed: dict[str, Any], db: str) -> None:
    port = free_port()
    server = f"http://127.0.0.1:{port}/fhir/R4"
    clock = WallClock()
    outbox = Outbox(db, clock=clock)
    outbox.enqueue("down", server, analysed)
    (state,) = outbox.deliver(send_with())
    assert state.status == "pending"
    assert "queued and will be retried" in delivery_note(state)
    clock.now += 10
    with FhirSandbox(port=port):
        (state,) = outbox.deliver(send_with())
        assert state.status == "delivered"
        assert f"DiagnosticReport/{state.report_id}" in delivery_note(state)
        exactly_one_report(server)


def test_server_answering_500(analysed: dict[str, Any], db: str, proxy: FaultyProxy) -> None:
    clock = WallClock()
    outbox = Outbox(db, clock=clock)
    outbox.enqueue("500", proxy.base_url, analysed)
    proxy.arm("error500", times=2)
    for _ in range(2):
        (state,) = outbox.deliver(send_with())
        assert state.status == "pending" and "500" in (state.last_error or "")
        assert "will be retried" in delivery_note(state)
        assert outbox.deliver(send_with()) == []  # backing off
        clock.now += 60
    (state,) = outbox.deliver(send_with())
    assert state.status == "delivered" and state.attempts == 3
    exactly_one_report(proxy.base_url)


def test_server_slower_than_the_timeout(
    analysed: dict[str, Any], db: str, proxy: FaultyProxy
) -> None:
    """The write lands but its answer comes too late: the retry must find it, not resend it."""
    clock = WallClock()
    outbox = Outbox(db, clock=clock)
    outbox.enqueue("slow", proxy.base_url, analysed)
    proxy.arm("slow", delay_s=3.0)
    (state,) = outbox.deliver(send_with(timeout_s=1.0))
    assert state.status == "pending" and "Timeout" in (state.last_error or "")
    assert "will be retried" in delivery_note(state)
    clock.now += 60
    (state,) = outbox.deliver(send_with(timeout_s=1.0))
    assert state.status == "delivered" and state.note == "found already written"
    exactly_one_report(proxy.base_url)


@pytest.fixture(scope="module")
def small_sandbox() -> Iterator[FhirSandbox]:
    """A sandbox that refuses request bodies over 200 kB (413), as proxies in front of EHRs do."""
    with FhirSandbox(env={"MAX_BODY_BYTES": "200000"}) as sandbox:
        yield sandbox


def test_413_for_an_oversized_bundle_degrades_to_a_report_without_overlays(
    analysed: dict[str, Any], db: str, small_sandbox: FhirSandbox
) -> None:
    small_sandbox.reset()
    outbox = Outbox(db)
    outbox.enqueue("413", small_sandbox.base_url, analysed)
    (state,) = outbox.deliver(send_with())
    assert state.status == "delivered" and "413" in (state.note or "")
    assert "saliency images were left out" in delivery_note(state)
    exactly_one_report(small_sandbox.base_url, overlays=0)
    with FhirClient(small_sandbox.base_url) as fhir:
        report = fhir.read("DiagnosticReport", state.report_id or "")
    assert OMITTED_PREFIX in report["conclusion"] and "media" not in report


def test_400_for_a_string_over_the_server_limit_degrades(
    analysed: dict[str, Any], db: str, fhir_url: str
) -> None:
    """Limits configured above the server's (1 MB per string in the sandbox, as Medplum): the
    server's 400 is answered by sending the report without its overlays."""
    bundle = copy.deepcopy(analysed)
    binary = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Binary")
    binary["resource"]["data"] = "iVBORw0K" + "A" * 1_500_000  # a 1.1 MB picture
    outbox = Outbox(db)
    outbox.enqueue("400", fhir_url, bundle)
    (state,) = outbox.deliver(send_with())
    assert state.status == "delivered" and "400" in (state.note or "")
    exactly_one_report(fhir_url, overlays=0)


CHILD = """
import sys
from mmcds.fhir.writeback import send_bundle
from mmcds.service.outbox import Outbox
Outbox(sys.argv[1]).deliver(lambda s, b: send_bundle(s, b, timeout_s=120))
print("recorded", flush=True)
"""


def test_process_killed_between_sending_and_recording_success(
    analysed: dict[str, Any], db: str, proxy: FaultyProxy
) -> None:
    outbox = Outbox(db)
    outbox.enqueue("killed", proxy.base_url, analysed)
    proxy.arm("hold")
    child = subprocess.Popen([sys.executable, "-c", CHILD, db], stdout=subprocess.PIPE)
    try:
        assert proxy.answered.wait(120), "the transaction never reached the server"
        os.kill(child.pid, signal.SIGKILL)  # the server has committed; the child never hears
        child.wait(30)
    finally:
        proxy.release.set()
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL and child.stdout is not None
    assert b"recorded" not in child.stdout.read()
    state = outbox.get("killed")
    assert state is not None and state.status == "pending" and state.attempts == 0
    assert "will be retried" in delivery_note(state)
    assert outbox.deliver(send_with()) == []  # the dead process's lease still holds the row
    # Recovery: once the lease has run out, a new process finds the report, sends nothing.
    later = Outbox(db, clock=lambda: time.time() + LEASE_S + 1)
    posts = sum(s.startswith("POST") for s in proxy.seen)
    (state,) = later.deliver(send_with())
    assert state.status == "delivered" and state.note == "found already written"
    assert sum(s.startswith("POST") for s in proxy.seen) == posts
    exactly_one_report(proxy.base_url)


def test_same_analysis_sent_concurrently_twice_creates_one_report(
    analysed: dict[str, Any], db: str, proxy: FaultyProxy
) -> None:
    """Two service workers on one database deliver the same report at the same moment."""
    first, second = Outbox(db), Outbox(db)
    first.enqueue("twice", proxy.base_url, analysed)
    second.enqueue("twice", proxy.base_url, analysed)  # the same analysis: kept once
    proxy.arm("slow", times=2, delay_s=1.0)  # both would be in flight together
    start = threading.Barrier(2)
    results: dict[str, Any] = {}

    def run(name: str, box: Outbox) -> None:
        start.wait()
        results[name] = box.deliver(send_with(), key="twice")

    threads = [threading.Thread(target=run, args=(n, b)) for n, b in (("a", first), ("b", second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(len(r) for r in results.values()) == [0, 1]  # one sent, one saw it claimed
    state = first.get("twice")
    assert state is not None and state.status == "delivered"
    exactly_one_report(proxy.base_url)


def test_two_outboxes_racing_still_write_one_report(
    analysed: dict[str, Any], tmp_path: Path, fhir_url: str
) -> None:
    """Separate databases (two deployments): ifNoneExist on the server keeps one report,
    Observation and Media; the Binary and the Provenance go to ids of the analysis (PUT), so
    there is one of each too, whichever transaction the server ran second."""
    boxes = [Outbox(f"sqlite:///{tmp_path / f'o{i}.db'}") for i in range(2)]
    for box in boxes:
        box.enqueue("race", fhir_url, analysed)
    threads = [threading.Thread(target=b.deliver, args=(send_with(),)) for b in boxes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {b.get("race").status for b in boxes} == {"delivered"}  # type: ignore[union-attr]
    assert len({b.get("race").report_id for b in boxes}) == 1  # type: ignore[union-attr]
    exactly_one_report(fhir_url)
    # and a sender that never searched first (its search answered before the other's
    # transaction landed) still adds nothing: the same transaction, run again as is
    with FhirClient(fhir_url) as fhir:
        fhir.transaction(analysed)
    exactly_one_report(fhir_url)


def _reanalysis(bundle: dict[str, Any], issued: str) -> dict[str, Any]:
    """The same patient analysed again with new inputs: a new identifier, a later time."""
    report = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    old_id = report["resource"]["identifier"][0]["value"]
    text = json.dumps(bundle).replace(old_id, f"new{old_id[3:]}")
    text = text.replace(report["resource"]["issued"], issued)
    return dict(json.loads(text))


def test_reanalysis_supersedes_the_earlier_preliminary_report(
    analysed: dict[str, Any], fhir_url: str
) -> None:
    first = send_bundle(fhir_url, analysed)
    second = send_bundle(fhir_url, _reanalysis(analysed, "2099-01-01T00:00:00+00:00"))
    assert second.superseded == (f"DiagnosticReport/{first.report_id}",)
    with FhirClient(fhir_url) as fhir:
        old = fhir.read("DiagnosticReport", first.report_id or "")
        new = fhir.read("DiagnosticReport", second.report_id or "")
        assert old["status"] == "entered-in-error" and new["status"] == "preliminary"
        for ref in old["result"]:
            assert fhir.read(*ref["reference"].split("/"))["status"] == "entered-in-error"
        (provenance,) = fhir.search("Provenance", {"target": f"DiagnosticReport/{new['id']}"})
    revisions = [e["what"]["reference"] for e in provenance["entity"] if e["role"] == "revision"]
    assert revisions == [f"DiagnosticReport/{old['id']}"]


def test_a_report_a_clinician_made_final_is_never_retired(
    analysed: dict[str, Any], fhir_url: str
) -> None:
    first = send_bundle(fhir_url, analysed)
    with FhirClient(fhir_url) as fhir:
        old = fhir.read("DiagnosticReport", first.report_id or "")
        fhir._request("PUT", f"DiagnosticReport/{old['id']}", json={**old, "status": "final"})
    second = send_bundle(fhir_url, _reanalysis(analysed, "2099-01-01T00:00:00+00:00"))
    assert second.superseded == ()
    with FhirClient(fhir_url) as fhir:
        assert fhir.read("DiagnosticReport", old["id"])["status"] == "final"


def test_rejected_report_is_logged_counted_and_re_driven(
    analysed: dict[str, Any], db: str, fhir_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad = copy.deepcopy(analysed)
    for entry in bad["entry"]:
        if entry["resource"]["resourceType"] == "Observation":
            entry["resource"]["valueQuantity"] = {"value": "not a number"}
    outbox = Outbox(db)
    outbox.enqueue("bad", fhir_url, bad)
    before = reports_total("rejected")
    (state,) = outbox.deliver(send_with())
    assert state.status == "rejected" and "400" in (state.last_error or "")
    assert "refused the report" in delivery_note(state) and "retried" not in delivery_note(
        state
    ).replace("not be retried", "")
    assert reports_total("rejected") == before + 1
    assert any(r.levelname == "ERROR" and "bad" in r.getMessage() for r in caplog.records)
    assert counts(fhir_url)["DiagnosticReport"] == 0
    assert outbox.deliver(send_with()) == []  # never retried on its own
    assert outbox.retry("bad").status == "pending"  # type: ignore[union-attr]


def test_dead_after_the_retry_budget(
    analysed: dict[str, Any], db: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = WallClock()
    outbox = Outbox(db, clock=clock, max_attempts=3)
    outbox.enqueue("dead", f"http://127.0.0.1:{free_port()}/fhir/R4", analysed)
    before = reports_total("dead")
    for _ in range(3):
        (state,) = outbox.deliver(send_with())
        clock.now += 600
    assert state.status == "dead" and state.attempts == 3
    assert "no longer retried" in delivery_note(state)
    assert reports_total("dead") == before + 1
    assert any(r.levelname == "ERROR" and "dead" in r.getMessage() for r in caplog.records)
    assert outbox.deliver(send_with()) == []
    caplog.set_level(logging.INFO)
