"""End to end in headless Chromium (Debian's, driven by Playwright): a real hook for a synthetic
patient, the card's link opened in the browser, the page's parts checked as a clinician sees
them, an overlay toggled, an override posted and found in the feedback store, the worklist
behind its login, and axe-core's accessibility check on every page. Screenshots go to
``build/test-artifacts/review/`` (or ``$MMCDS_TEST_ARTIFACTS``)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from mmcds.dev.servers import free_port
from mmcds.fusion.pipeline import Pipeline
from mmcds.service.api import create_app
from mmcds.service.auth import sign_hook_jwt
from mmcds.service.review.tokens import hash_password

sync_api = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
AXE = REPO / "deploy" / "browser" / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = Path(
    os.environ.get("MMCDS_TEST_ARTIFACTS", REPO / "build" / "test-artifacts" / "review")
)
PASSWORD = "a long ward password"


def _need(path: Path | str, why: str) -> None:
    if not Path(path).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{why} missing in CI: {path}")
        pytest.skip(f"{why} missing: {path} (bash deploy/setup.sh installs it)")


@pytest.fixture
def live(
    make_settings: Callable[..., Any],
    pipeline: Pipeline,
    fhir_url: str,
    dicomweb: Any,
    tmp_path: Path,
) -> Iterator[tuple[str, Any, Any]]:
    """The service under uvicorn on a free port: (base URL, settings, app)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = make_settings(
        [fhir_url],
        dicomweb,
        public_base_url=base,
        port=port,
        home=tmp_path,
        clinicians={"dr.ward": hash_password(PASSWORD)},
    )
    app = create_app(settings, pipeline)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "service did not start"
        time.sleep(0.05)
    try:
        yield base, settings, app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _hook(base: str, settings: Any, key: Any, fhir_url: str, patient_id: str) -> dict[str, Any]:
    path = "/cds-services/mmcds-patient-view"
    (issuer,) = settings.trusted_issuers
    token = sign_hook_jwt(key, issuer=issuer, audience=f"{base}{path}", kid=key.kid)
    body = {
        "hookInstance": "3f1c2b1e-2c4f-4a57-9d43-7d0d3c1f8a10",
        "hook": "patient-view",
        "fhirServer": fhir_url,
        "context": {"userId": "Practitioner/1", "patientId": patient_id},
    }
    response = httpx.post(
        f"{base}{path}", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=300
    )
    assert response.status_code == 200, response.text
    return response.json()["cards"][0]


def _axe(page: Any, name: str) -> None:
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("async () => await axe.run(document)")
    bad = [v for v in result["violations"] if v["impact"] in ("serious", "critical")]
    summary = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3]) for v in bad]
    assert not bad, f"{name}: {summary}"


def test_review_page_and_worklist_in_chromium(
    live: tuple[str, Any, Any],
    load_cohort: Callable[[Path | None], list[str]],
    fhir_url: str,
    ehr_key: Any,
) -> None:
    _need(CHROMIUM, "chromium")
    _need(AXE, "axe-core (npm, deploy/browser)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    base, settings, app = live
    ids = load_cohort(None)
    card = _hook(base, settings, ehr_key, fhir_url, ids[0])
    link = card["links"][0]["url"]
    assert link.startswith(f"{base}/review/") and ids[0] not in link

    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        # bypass_csp only so that the test can inject axe-core; the pages run under their CSP
        context = browser.new_context(bypass_csp=True, viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on(
            "response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None
        )
        page.goto(link)

        # the summary: each finding with its probability or why it was not assessed
        expect = sync_api.expect
        expect(page.locator("h1")).to_contain_text("AI risk summary")
        rows = page.locator("table.findings tbody tr")
        expect(rows).to_have_count(4)
        expect(page.locator(".summary-line")).to_have_text(card["summary"])
        expect(page.locator(".limits")).to_be_visible()

        # the image at full resolution, then a heatmap layer toggled on and off
        base_img = page.locator("figure.viewer img.base").first
        expect(base_img).to_be_visible()
        assert base_img.evaluate("img => img.complete && img.naturalWidth") > 0
        toggle = page.locator("input.layer-toggle").first
        finding = toggle.get_attribute("data-finding")
        method = page.locator("input.method:checked").first.get_attribute("value")
        layer = page.locator(f"img.layer[data-finding='{finding}'][data-method='{method}']")
        expect(layer).to_be_hidden()
        toggle.check()
        expect(layer).to_be_visible()
        page.wait_for_function(
            "el => el.complete && el.naturalWidth > 0", arg=layer.element_handle()
        )
        boxes = page.locator(f"svg.boxes g[data-finding='{finding}'][data-method='{method}']")
        assert boxes.get_attribute("hidden") is None
        page.locator("input.opacity").first.fill("30")
        assert layer.evaluate("el => el.style.opacity") == "0.3"
        page.locator("select.preset").first.select_option("lung")
        page.wait_for_function(
            "el => el.src.includes('preset=lung') && el.complete && el.naturalWidth > 0",
            arg=base_img.element_handle(),
        )
        page.locator("button.zoom-full").first.click()
        natural = base_img.evaluate("img => img.naturalWidth")
        assert abs(base_img.evaluate("img => img.getBoundingClientRect().width") - natural) < 2
        page.locator("figure.viewer").first.screenshot(path=str(ARTIFACTS / "overlay.png"))
        toggle.uncheck()
        expect(layer).to_be_hidden()

        # notes' evidence: highlighted, with its direction, and the whole note at that place
        evidence = page.locator("li.evidence").first
        expect(evidence.locator("mark")).to_be_visible()
        direction = evidence.locator(".badge").first.inner_text()
        assert direction in ("supports", "argues against"), direction
        # labs: value, unit, reference range and a trend
        lab_row = page.locator("table.labs tbody tr").first
        expect(lab_row).to_be_visible()
        assert lab_row.locator("td.num").first.inner_text().strip()
        expect(lab_row.locator("svg.trend")).to_be_attached()
        expect(page.locator("svg.bars").first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "review.png"), full_page=True)
        _axe(page, "review page")

        evidence.locator("a").click()
        expect(page.locator("pre.note mark").first).to_be_visible()
        assert "#ev-" in page.url
        _axe(page, "note page")
        page.go_back()

        # Override with a reason: the outcome is shown, and stored where CDS Hooks feedback is
        page.select_option("#reason", "disagree")
        page.fill("#comment", "consolidation not seen on my read")
        page.click("button.override-button")
        expect(page.locator(".recorded")).to_contain_text("Overridden")
        stored = app.state.feedback.list(analysis_id=None)
        assert [(f.outcome, f.source, f.card_uuid) for f in stored] == [
            ("overridden", "review-page", card["uuid"])
        ]
        assert stored[0].override_reason.code == "disagree"

        # the worklist: login first, then the patient in its place
        page.goto(f"{base}/worklist")
        assert page.url.endswith("/login")
        _axe(page, "login page")
        page.fill("#user", "dr.ward")
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        assert page.url.endswith("/worklist")
        place = app.state.analysis.analyses.recent()
        assessed = any(f["status"] == "assessed" for f in place[0].assessment["findings"])
        table = page.locator("#ranked" if assessed else "#apart")
        expect(table.locator("tbody th", has_text=ids[0])).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "worklist.png"), full_page=True)
        _axe(page, "worklist")
        hrefs = page.eval_on_selector_all(
            "a, img, form", "els => els.map(e => e.href || e.src || e.action)"
        )
        assert all(ids[0] not in h for h in hrefs if h)
        table.locator("a").first.click()
        expect(page.locator("h1")).to_contain_text("AI risk summary")
        browser.close()
    assert not errors, errors
