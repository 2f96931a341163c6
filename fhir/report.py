"""Write-back: an analysis as one FHIR R4 transaction Bundle.

The Bundle holds the AI ``Device``, one ``Observation`` per finding, the ``DiagnosticReport``
(status ``preliminary``) and a ``Provenance`` naming the Device as author and the inputs as
entities (HL7 AI Transparency on FHIR). Every resource carries the AIAST security label. The
report's identifier is a hash of model version + input hashes and is created with
``ifNoneExist``, so sending the same analysis twice creates one report; so are the
Observations and the overlays' ``Media``, while the overlays' ``Binary`` and the ``Provenance``
(no identifier to search by) are written with ``PUT`` at ids made from the report's identifier.

Each resource is validated against the R4 (``fhir.resources.R4B``) models before it is sent.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from mmcds.fhir.bundle_limits import BundleLimits, fit_bundle, review_png
from mmcds.findings import display, finding
from mmcds.records import Analysis, Explanation, FindingScore

REPORT_SYSTEM = "urn:mmcds:analysis"
DEVICE_SYSTEM = "urn:mmcds:model"
FINDING_SYSTEM = "urn:mmcds:finding-result"
OVERLAY_SYSTEM = "urn:mmcds:overlay"
AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
REPORT_CODING = {
    "system": "urn:mmcds:report",
    "code": "multimodal-risk-summary",
    "display": "Multimodal AI diagnosis-support summary",
}
REPORT_CODE = {"coding": [REPORT_CODING], "text": "AI diagnosis-support summary (preliminary)"}


SNOMED = "http://snomed.info/sct"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
#: Why a finding carries no value: its input was not one the model supports, or no validated
#: operating point covered it.
DATA_ABSENT_CODE = {
    "abstained": "unsupported",
    "insufficient_inputs": "not-performed",
    "not_validated": "not-performed",
}
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"


def _urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _meta() -> dict[str, Any]:
    return {"security": [AIAST]}


def _inputs(analysis: Analysis) -> list[str]:
    rec = analysis.record
    refs = {img.reference for img in rec.images if img.reference}
    refs |= {n.reference for n in rec.notes}
    refs |= {str(r) for r in rec.labs.get("reference", []) if r}
    return sorted(refs)


def _conclusion(analysis: Analysis) -> str:
    a = analysis.assessment
    lines = [] if a.trained else ["UNTRAINED model: scores carry no clinical meaning."]
    lines += [
        f"{display(f.finding)}: {f.probability:.2f} ({f.level})"
        if f.assessed
        else f"{display(f.finding)}: not assessed ({f.reason or f.status})."
        for f in a.findings
    ]
    if analysis.record.missing:
        lines.append(f"{len(analysis.record.missing)} input(s) unavailable to the model.")
    lines.append("Preliminary AI output; requires clinician review.")
    return " ".join(lines)


@dataclass(frozen=True)
class _Context:
    """What every resource of one report bundle shares."""

    analysis: Analysis
    issued: str
    subject: dict[str, str]
    device_urn: str
    report_urn: str
    inputs: list[dict[str, str]]
    limits: BundleLimits


def _overlays(analysis: Analysis, explanation: Explanation) -> list[tuple[str, str, bytes]]:
    """(finding, SOP UID, PNG) of each CNN saliency overlay (the ViT's stay on the review page)."""
    return [
        (s.finding, s.sop_uid, s.overlay_png)
        for s in explanation.images
        if s.overlay_png is not None and s.in_report
    ]


def _overlay_entries(ctx: _Context, explanation: Explanation) -> tuple[list[Any], list[Any]]:
    """A ``Binary`` (the PNG, sized for review) and a ``Media`` pointing at it by URL for each
    overlay, and the report's ``media`` links. Never megabytes inline in ``Media``: real
    servers cap strings (Medplum at 1 MB) and resources."""
    entries, links = [], []
    for name, sop_uid, png in _overlays(ctx.analysis, explanation):
        png = review_png(png, ctx.limits)
        binary_urn, media_urn = _urn(), _urn()
        overlay_id = f"{ctx.analysis.identifier}:{name}:{sop_uid}"
        binary = {
            "resourceType": "Binary",
            "id": _stable_id(ctx, hashlib.sha256(overlay_id.encode()).hexdigest()[:16]),
            "meta": _meta(),
            "contentType": "image/png",
            "securityContext": {"reference": ctx.report_urn},
            "data": base64.b64encode(png).decode(),
        }
        title = f"AI saliency (preliminary): {display(name)}, image {sop_uid}"
        media = {
            "resourceType": "Media",
            "meta": _meta(),
            "identifier": [
                {
                    "system": OVERLAY_SYSTEM,
                    "value": overlay_id,
                }
            ],
            "status": "completed",
            "type": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/media-type", "code": "image"}
                ]
            },
            "subject": ctx.subject,
            "createdDateTime": ctx.issued,
            "content": {
                "contentType": "image/png",
                # The transaction rewrites the Binary's fullUrl to its id (FHIR's rules).
                "url": binary_urn,
                "size": len(png),
                "hash": base64.b64encode(hashlib.sha1(png).digest()).decode(),
                "title": title,
            },
            "note": [{"text": "Heatmap of what moved the model's score; not proof of disease."}],
        }
        entries.append(_put(binary_urn, binary))
        condition = f"identifier={OVERLAY_SYSTEM}|{overlay_id}"
        entries.append(_entry(media_urn, media, ifNoneExist=condition))
        links.append({"comment": title, "link": {"reference": media_urn}})
    return entries, links


def _entry(urn: str, resource: dict[str, Any], **request: str) -> dict[str, Any]:
    return {
        "fullUrl": urn,
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], **request},
    }


def _stable_id(ctx: _Context, part: str) -> str:
    """A resource id of this analysis (its identifier and ``part``; FHIR ids take 64 of
    ``[A-Za-z0-9.-]``, and a letter first keeps servers that refuse numeric client ids happy)."""
    return f"mmcds-{ctx.analysis.identifier}-{part}"


def _put(urn: str, resource: dict[str, Any]) -> dict[str, Any]:
    """Update-as-create at the resource's own ``id``: how a resource with no identifier to search
    by (a Binary, a Provenance) is written once, however many senders race. Two deployments with
    separate outboxes each send the transaction; ``ifNoneExist`` keeps one report, Observation
    and Media, and these land on the same id (a new version of the same resource)."""
    url = f"{resource['resourceType']}/{resource['id']}"
    return {"fullUrl": urn, "resource": resource, "request": {"method": "PUT", "url": url}}


def _device_entry(ctx: _Context) -> dict[str, Any]:
    a = ctx.analysis.assessment
    device_id = f"{a.model_id}@{a.model_version}"
    device = {
        "resourceType": "Device",
        "meta": _meta(),
        "identifier": [{"system": DEVICE_SYSTEM, "value": device_id}],
        "deviceName": [{"name": a.model_id, "type": "model-name"}],
        "version": [{"value": a.model_version}],
        "status": "active",
    }
    return _entry(ctx.device_urn, device, ifNoneExist=f"identifier={DEVICE_SYSTEM}|{device_id}")


def _observation(ctx: _Context, score: FindingScore) -> dict[str, Any]:
    entry = finding(score.finding)
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "meta": _meta(),
        "identifier": [
            {"system": FINDING_SYSTEM, "value": f"{ctx.analysis.identifier}:{score.finding}"}
        ],
        "status": "preliminary",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging"}]}],
        "code": {
            "coding": [{"system": SNOMED, "code": entry.snomed, "display": entry.display}],
            "text": f"AI probability of {entry.display.lower()}",
        },
        "subject": ctx.subject,
        "effectiveDateTime": ctx.issued,
        "issued": ctx.issued,
        "valueQuantity": {
            "value": round(score.probability, 4),
            "unit": "probability",
            "system": "http://unitsofmeasure.org",
            "code": "1",
        },
        "interpretation": [{"text": str(score.level)}],
        "device": {"reference": ctx.device_urn},
    }
    if not score.assessed:
        # No number to act on: the value is absent for a stated reason (DESIGN §8).
        del observation["valueQuantity"]
        observation["dataAbsentReason"] = {
            "coding": [{"system": DATA_ABSENT, "code": DATA_ABSENT_CODE[score.status]}],
            "text": score.status.replace("_", " "),
        }
        observation["interpretation"] = [{"text": score.status.replace("_", " ")}]
        observation["note"] = [{"text": score.reason or score.status}]
    if ctx.inputs:
        observation["derivedFrom"] = ctx.inputs
    if ctx.analysis.record.encounter:
        observation["encounter"] = {"reference": ctx.analysis.record.encounter}
    return observation


def _report(
    ctx: _Context,
    explanation: Explanation,
    results: list[dict[str, str]],
    media: list[dict[str, Any]],
) -> dict[str, Any]:
    analysis = ctx.analysis
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "meta": _meta(),
        "identifier": [{"system": REPORT_SYSTEM, "value": analysis.identifier}],
        "status": "preliminary",
        "category": [{"coding": [{"system": V2_0074, "code": "OTH", "display": "Other"}]}],
        "code": REPORT_CODE,
        "subject": ctx.subject,
        "effectiveDateTime": ctx.issued,
        "issued": ctx.issued,
        "result": results,
        "conclusion": _conclusion(analysis),
        "presentedForm": [
            {
                "contentType": "text/html; charset=utf-8",
                "title": "AI diagnosis-support summary",
                "data": base64.b64encode(explanation.summary_html.encode()).decode(),
            }
        ],
    }
    if media:
        report["media"] = media
    studies = sorted({img.reference for img in analysis.record.images if img.reference})
    if studies:
        report["imagingStudy"] = [{"reference": s} for s in studies]
    if analysis.record.encounter:
        report["encounter"] = {"reference": analysis.record.encounter}
    return report


def _provenance(ctx: _Context, results: list[dict[str, str]]) -> dict[str, Any]:
    provenance: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": _stable_id(ctx, "provenance"),
        "meta": _meta(),
        "target": [{"reference": ctx.report_urn}, *results],
        "recorded": ctx.issued,
        "agent": [
            {
                "type": {"coding": [{"system": PROVENANCE_PARTICIPANT, "code": "author"}]},
                "who": {"reference": ctx.device_urn},
            }
        ],
    }
    if ctx.inputs:
        provenance["entity"] = [{"role": "source", "what": ref} for ref in ctx.inputs]
    return provenance


def report_bundle(
    analysis: Analysis,
    explanation: Explanation,
    *,
    now: datetime | None = None,
    limits: BundleLimits | None = None,
) -> dict[str, Any]:
    """The transaction Bundle that writes this analysis back to the EHR: the Device, one
    Observation per finding, the overlays (``Binary`` + ``Media``), the DiagnosticReport, the
    Provenance; fitted to ``limits`` (overlays dropped, with a note, when they do not fit)."""
    limits = limits or BundleLimits()
    issued = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    ctx = _Context(
        analysis=analysis,
        issued=issued,
        subject={"reference": f"Patient/{analysis.record.patient.id}"},
        device_urn=_urn(),
        report_urn=_urn(),
        inputs=[{"reference": r} for r in _inputs(analysis)],
        limits=limits,
    )
    entries = [_device_entry(ctx)]
    results: list[dict[str, str]] = []
    for score in analysis.assessment.findings:
        urn = _urn()
        results.append({"reference": urn})
        observation = _observation(ctx, score)
        ident = observation["identifier"][0]
        condition = f"identifier={ident['system']}|{ident['value']}"
        entries.append(_entry(urn, observation, ifNoneExist=condition))
    overlay_entries, media_links = _overlay_entries(ctx, explanation)
    entries += overlay_entries
    report = _report(ctx, explanation, results, media_links)
    identifier = f"identifier={REPORT_SYSTEM}|{analysis.identifier}"
    entries.append(_entry(ctx.report_urn, report, ifNoneExist=identifier))
    entries.append(_put(_urn(), _provenance(ctx, results)))
    bundle = fit_bundle({"resourceType": "Bundle", "type": "transaction", "entry": entries}, limits)
    Bundle.model_validate(bundle)  # fail here, with the field named, not at the EHR
    return bundle


def written_report_id(response: dict[str, Any]) -> str | None:
    """The DiagnosticReport id from a transaction-response Bundle."""
    for entry in response.get("entry") or []:
        location = (entry.get("response") or {}).get("location", "")
        if location.startswith("DiagnosticReport/"):
            return str(location.split("/")[1])
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "DiagnosticReport":
            return str(resource.get("id"))
    return None
