"""Send a report transaction Bundle to the EHR's FHIR server (the outbox's ``Send``).

One delivery attempt, exactly-once by construction:

1. **Already there?** Search the report's deterministic identifier first. A transaction whose
   answer was lost (timeout, a process killed before it recorded success) has landed; resending
   it would only add versions (``ifNoneExist`` guards the report, the Observations and the
   Media; the Binary and the Provenance, which have no identifier to search by, are written with
   PUT at ids derived from the analysis, so a second sender updates rather than duplicates them).
2. **Supersede.** Earlier *preliminary* reports of this service for the patient are marked
   ``entered-in-error`` (with their Observations), in the same transaction, and the new
   report's Provenance names each as a ``revision`` entity. Reports a clinician has made
   ``final`` are never touched. Why ``entered-in-error``: see README, "Superseded reports".
3. **Send**, without transport retries (a POST retried after a timeout could land twice; the
   outbox retries instead, starting again at 1). A 413 or 400 for a bundle with overlays is
   answered by sending it once more without them, saying so in the report: a report without
   pictures beats no report.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from mmcds.errors import DeliveryRejected
from mmcds.fhir.bundle_limits import has_overlays, without_overlays
from mmcds.fhir.client import FhirClient, FhirError, FhirUnavailable
from mmcds.fhir.report import REPORT_CODING, REPORT_SYSTEM, written_report_id

#: 4xx answers that say "not now" rather than "never": an expired or revoked token (after the
#: auth's own refresh), a rate limit, a version conflict while superseding.
TRANSIENT_4XX = {401, 403, 408, 409, 412, 429}
#: Answers to a bundle with overlays that sending it without them may cure.
DEGRADE_ON = {400, 413, 422}


@dataclass(frozen=True)
class Sent:
    """What one delivery achieved: the report id, and a note when it is not the whole story
    (overlays left out, or the report was found already written)."""

    report_id: str | None
    note: str | None = None
    superseded: tuple[str, ...] = ()


def _report_entry(bundle: dict[str, Any]) -> dict[str, Any]:
    for entry in bundle.get("entry") or []:
        if (entry.get("resource") or {}).get("resourceType") == "DiagnosticReport":
            return dict(entry)
    raise DeliveryRejected("the bundle holds no DiagnosticReport")


def _identifier(report: dict[str, Any]) -> str:
    for ident in report.get("identifier") or []:
        if ident.get("system") == REPORT_SYSTEM:
            return f"{REPORT_SYSTEM}|{ident['value']}"
    raise DeliveryRejected(f"the DiagnosticReport has no {REPORT_SYSTEM} identifier")


def _as_entered_in_error(resource: dict[str, Any]) -> dict[str, Any]:
    version = (resource.get("meta") or {}).get("versionId")
    updated = {**resource, "status": "entered-in-error"}
    request: dict[str, str] = {
        "method": "PUT",
        "url": f"{resource['resourceType']}/{resource['id']}",
    }
    if version:
        request["ifMatch"] = f'W/"{version}"'  # a concurrent change makes this a 412: retried
    return {"resource": updated, "request": request}


def _when(value: Any) -> datetime:
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)  # unreadable: older than anything
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _supersede(client: FhirClient, bundle: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``bundle`` plus the updates that retire earlier preliminary reports (and the list)."""
    report = _report_entry(bundle)["resource"]
    subject = (report.get("subject") or {}).get("reference")
    if not subject:
        return bundle, []
    code = REPORT_CODING
    earlier = [
        r
        for r in client.search(
            "DiagnosticReport",
            {
                "subject": subject,
                "code": f"{code['system']}|{code['code']}",
                "status": "preliminary",
            },
        )
        if _when(r.get("issued")) <= _when(report.get("issued"))  # never retire a newer one
    ]
    if not earlier:
        return bundle, []
    out = copy.deepcopy(bundle)
    retired = []
    for old in earlier:
        retired.append(f"DiagnosticReport/{old['id']}")
        out["entry"].append(_as_entered_in_error(old))
        for result in old.get("result") or []:
            ref = str(result.get("reference", ""))
            if ref.startswith("Observation/"):
                observation = client.read("Observation", ref.split("/")[1])
                if observation.get("status") == "preliminary":
                    out["entry"].append(_as_entered_in_error(observation))
    for entry in out["entry"]:
        if entry["resource"]["resourceType"] == "Provenance":
            entities = entry["resource"].setdefault("entity", [])
            entities += [{"role": "revision", "what": {"reference": ref}} for ref in retired]
    return out, retired


def _post(client: FhirClient, bundle: dict[str, Any]) -> str | None:
    try:
        return written_report_id(client.transaction(bundle))
    except FhirUnavailable:
        raise
    except FhirError as exc:
        if exc.status in TRANSIENT_4XX:
            raise FhirUnavailable(str(exc), exc.status) from exc
        raise


def send_bundle(
    fhir_server: str,
    bundle: dict[str, Any],
    *,
    timeout_s: float = 10.0,
    auth: httpx.Auth | None = None,
) -> Sent:
    """One delivery attempt (see the module docstring).

    Unreachable, 5xx or a transient 4xx: ``FhirUnavailable`` propagates and the outbox retries.
    Any other refusal (the Bundle itself is wrong) raises ``DeliveryRejected`` with the
    server's reason: resending the same bytes cannot help.
    """
    with FhirClient(fhir_server, timeout=timeout_s, auth=auth, retries=1) as client:
        try:
            identifier = _identifier(_report_entry(bundle)["resource"])
            existing = client.search("DiagnosticReport", {"identifier": identifier})
            if existing:
                return Sent(str(existing[0]["id"]), note="found already written")
            full, retired = _supersede(client, bundle)
        except FhirError as exc:
            if exc.status in TRANSIENT_4XX or isinstance(exc, FhirUnavailable):
                raise FhirUnavailable(str(exc), exc.status) from exc
            raise DeliveryRejected(str(exc)) from exc
        try:
            return Sent(_post(client, full), superseded=tuple(retired))
        except FhirUnavailable:
            raise
        except FhirError as exc:
            if exc.status not in DEGRADE_ON or not has_overlays(full):
                raise DeliveryRejected(str(exc)) from exc
            first = exc
        why = f"the FHIR server refused them with HTTP {first.status}"
        try:
            report_id = _post(client, without_overlays(full, why))
        except FhirUnavailable:
            raise
        except FhirError as exc:
            raise DeliveryRejected(f"{exc} (and with overlays: {first})") from exc
        return Sent(report_id, note=f"overlays left out: {why}", superseded=tuple(retired))
