"""Write-back: an analysis as one FHIR R4 transaction Bundle.

The Bundle holds the AI ``Device``, one ``Observation`` per finding, the ``DiagnosticReport``
(status ``preliminary``) and a ``Provenance`` naming the Device as author and the inputs as
entities (HL7 AI Transparency on FHIR). Every resource carries the AIAST security label. The
report's identifier is a hash of model version + input hashes and is created with
``ifNoneExist``, so sending the same analysis twice creates one report.

Each resource is validated against the R4 (``fhir.resources.R4B``) models before it is sent.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from mmcds.findings import BY_NAME
from mmcds.pipeline import Analysis
from mmcds.records import Explanation

REPORT_SYSTEM = "urn:mmcds:analysis"
DEVICE_SYSTEM = "urn:mmcds:model"
AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
REPORT_CODE = {
    "coding": [
        {
            "system": "urn:mmcds:report",
            "code": "multimodal-risk-summary",
            "display": "Multimodal AI diagnosis-support summary",
        }
    ],
    "text": "AI diagnosis-support summary (preliminary)",
}


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
    lines += [f"{BY_NAME[f.finding].display}: {f.probability:.2f} ({f.level})" for f in a.findings]
    if analysis.record.missing:
        lines.append(f"{len(analysis.record.missing)} input(s) unavailable to the model.")
    lines.append("Preliminary AI output; requires clinician review.")
    return " ".join(lines)


def _media(analysis: Analysis, explanation: Explanation, issued: str) -> list[dict[str, Any]]:
    """One Media per CNN saliency overlay (the ViT's maps stay on the review page)."""
    subject = {"reference": f"Patient/{analysis.record.patient.id}"}
    media = []
    for s in explanation.images:
        if s.overlay_png is None or not s.method.endswith("-cnn"):  # any CNN explainer version
            continue
        title = f"AI saliency (preliminary): {BY_NAME[s.finding].display}, image {s.sop_uid}"
        media.append(
            {
                "resourceType": "Media",
                "meta": _meta(),
                "status": "completed",
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/media-type",
                            "code": "image",
                        }
                    ]
                },
                "subject": subject,
                "createdDateTime": issued,
                "content": {
                    "contentType": "image/png",
                    "title": title,
                    "data": base64.b64encode(s.overlay_png).decode(),
                },
                "note": [
                    {"text": "Heatmap of what moved the model's score; not proof of disease."}
                ],
            }
        )
    return media


def report_bundle(
    analysis: Analysis, explanation: Explanation, *, now: datetime | None = None
) -> dict[str, Any]:
    """The transaction Bundle that writes this analysis back to the EHR."""
    now = now or datetime.now(UTC)
    issued = now.isoformat(timespec="seconds")
    a = analysis.assessment
    subject = {"reference": f"Patient/{analysis.record.patient.id}"}
    device_id = f"{a.model_id}@{a.model_version}"
    device_urn, report_urn = _urn(), _urn()
    inputs = [{"reference": r} for r in _inputs(analysis)]

    entries: list[dict[str, Any]] = [
        {
            "fullUrl": device_urn,
            "resource": {
                "resourceType": "Device",
                "meta": _meta(),
                "identifier": [{"system": DEVICE_SYSTEM, "value": device_id}],
                "deviceName": [{"name": a.model_id, "type": "model-name"}],
                "version": [{"value": a.model_version}],
                "status": "active",
            },
            "request": {
                "method": "POST",
                "url": "Device",
                "ifNoneExist": f"identifier={DEVICE_SYSTEM}|{device_id}",
            },
        }
    ]
    result_refs = []
    for score in a.findings:
        finding = BY_NAME[score.finding]
        urn = _urn()
        result_refs.append({"reference": urn})
        observation: dict[str, Any] = {
            "resourceType": "Observation",
            "meta": _meta(),
            "status": "preliminary",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "imaging",
                        }
                    ]
                }
            ],
            "code": {
                "coding": [
                    {
                        "system": "http://snomed.info/sct",
                        "code": finding.snomed,
                        "display": finding.display,
                    }
                ],
                "text": f"AI probability of {finding.display.lower()}",
            },
            "subject": subject,
            "effectiveDateTime": issued,
            "issued": issued,
            "valueQuantity": {
                "value": round(score.probability, 4),
                "unit": "probability",
                "system": "http://unitsofmeasure.org",
                "code": "1",
            },
            "interpretation": [{"text": str(score.level)}],
            "device": {"reference": device_urn},
        }
        if inputs:
            observation["derivedFrom"] = inputs
        if analysis.record.encounter:
            observation["encounter"] = {"reference": analysis.record.encounter}
        entries.append(
            {
                "fullUrl": urn,
                "resource": observation,
                "request": {"method": "POST", "url": "Observation"},
            }
        )

    conclusion = _conclusion(analysis)
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "meta": _meta(),
        "identifier": [{"system": REPORT_SYSTEM, "value": analysis.identifier}],
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "OTH",
                        "display": "Other",
                    }
                ]
            }
        ],
        "code": REPORT_CODE,
        "subject": subject,
        "effectiveDateTime": issued,
        "issued": issued,
        "result": result_refs,
        "conclusion": conclusion,
        "presentedForm": [
            {
                "contentType": "text/html; charset=utf-8",
                "title": "AI diagnosis-support summary",
                "data": base64.b64encode(explanation.summary_html.encode()).decode(),
            }
        ],
    }
    media_refs = []
    for media in _media(analysis, explanation, issued):
        urn = _urn()
        media_refs.append({"comment": media["content"]["title"], "link": {"reference": urn}})
        entries.append(
            {"fullUrl": urn, "resource": media, "request": {"method": "POST", "url": "Media"}}
        )
    if media_refs:
        report["media"] = media_refs
    studies = sorted({img.reference for img in analysis.record.images if img.reference})
    if studies:
        report["imagingStudy"] = [{"reference": s} for s in studies]
    if analysis.record.encounter:
        report["encounter"] = {"reference": analysis.record.encounter}
    entries.append(
        {
            "fullUrl": report_urn,
            "resource": report,
            "request": {
                "method": "POST",
                "url": "DiagnosticReport",
                "ifNoneExist": f"identifier={REPORT_SYSTEM}|{analysis.identifier}",
            },
        }
    )
    provenance: dict[str, Any] = {
        "resourceType": "Provenance",
        "meta": _meta(),
        "target": [{"reference": report_urn}, *result_refs],
        "recorded": issued,
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "author",
                        }
                    ]
                },
                "who": {"reference": device_urn},
            }
        ],
    }
    if inputs:
        provenance["entity"] = [{"role": "source", "what": ref} for ref in inputs]
    entries.append(
        {
            "fullUrl": _urn(),
            "resource": provenance,
            "request": {"method": "POST", "url": "Provenance"},
        }
    )

    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
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
