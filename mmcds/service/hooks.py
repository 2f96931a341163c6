"""The CDS services this server offers: which hook each answers, what it prefetches, what its
context must hold, and which draft orders it acts on.

``patient-view`` shows the patient's AI risk summary. ``order-select`` and ``order-sign`` show
the same summary while a diagnostic-imaging ``ServiceRequest`` is being ordered (and nothing for
other orders: a medication order gets ``{"cards": []}`` without any analysis); ``order-sign``
adds, where a finding is assessed at ``warning`` or above, a suggestion to record it as the
order's reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmcds.errors import InputRejected
from mmcds.fhir.prefetch import prefetch_templates
from mmcds.service.fast_path import currency_templates
from mmcds.service.schema import ServiceDescription

SNOMED = "http://snomed.info/sct"
# ServiceRequest.category codes meaning "imaging" (SNOMED: Imaging, Radiology procedure).
IMAGING_CATEGORIES = {"363679005", "394914008", "371527006"}
# Code systems whose every code is an imaging procedure (RadLex Playbook).
IMAGING_CODE_SYSTEMS = {"http://www.radlex.org", "http://loinc.org/radlex"}
# Words of an imaging order's code text when it carries neither of the above (LOINC imaging
# codes have no category of their own in a ServiceRequest).
IMAGING_WORDS = ("xr ", "x-ray", "radiograph", "ct ", "mr ", "mri", "mra ", "us ", "ultrasound")


class ContextRejected(InputRejected):
    """The hook's ``context`` lacks what this hook requires; the message says what."""


@dataclass(frozen=True)
class HookService:
    id: str
    hook: str
    title: str
    description: str

    def describe(self) -> ServiceDescription:
        return ServiceDescription(
            id=self.id,
            hook=self.hook,
            title=self.title,
            description=self.description,
            # gather's reads, and the searches that tell whether a stored answer is current
            prefetch=prefetch_templates() | currency_templates(),
        )

    @property
    def orders_hook(self) -> bool:
        return self.hook in ("order-select", "order-sign")


_SUMMARY = (
    "Fuses chest imaging, clinical notes and labs into a preliminary, calibrated risk summary "
    "for pneumonia, heart failure, pleural effusion and pneumothorax, with the evidence behind it."
)
SERVICES: dict[str, HookService] = {
    s.id: s
    for s in (
        HookService("mmcds-patient-view", "patient-view", "Multimodal AI risk summary", _SUMMARY),
        HookService(
            "mmcds-order-select",
            "order-select",
            "AI findings while ordering imaging",
            "While a diagnostic-imaging order is selected, shows the patient's current AI "
            "findings and their evidence. " + _SUMMARY,
        ),
        HookService(
            "mmcds-order-sign",
            "order-sign",
            "AI findings when signing an imaging order",
            "When a diagnostic-imaging order is signed, shows the patient's current AI findings "
            "and suggests recording an assessed finding as the order's reason. " + _SUMMARY,
        ),
    )
}


def check_context(service: HookService, context: dict[str, Any]) -> str:
    """The patient id; ``ContextRejected`` when the context lacks what the hook requires."""
    patient_id = context.get("patientId")
    if not isinstance(patient_id, str) or not patient_id or len(patient_id) > 64:
        raise ContextRejected(f"context.patientId is required for {service.hook}")
    if service.orders_hook:
        draft = context.get("draftOrders")
        if not isinstance(draft, dict) or draft.get("resourceType") != "Bundle":
            raise ContextRejected(f"context.draftOrders (a Bundle) is required for {service.hook}")
        if service.hook == "order-select":
            selections = context.get("selections")
            if not isinstance(selections, list) or not all(isinstance(s, str) for s in selections):
                raise ContextRejected("context.selections (a list of references) is required")
    return patient_id


def _codings(concept: Any) -> list[dict[str, Any]]:
    if not isinstance(concept, dict):
        return []
    return [c for c in concept.get("coding") or [] if isinstance(c, dict)]


def is_imaging_order(resource: dict[str, Any]) -> bool:
    if resource.get("resourceType") != "ServiceRequest":
        return False
    categories = resource.get("category") or []
    for category in categories if isinstance(categories, list) else []:
        if any(c.get("code") in IMAGING_CATEGORIES for c in _codings(category)):
            return True
        if "imaging" in str((category or {}).get("text", "")).lower():
            return True
    code = resource.get("code")
    if any(c.get("system") in IMAGING_CODE_SYSTEMS for c in _codings(code)):
        return True
    words = " ".join(
        [str((code or {}).get("text", ""))] + [str(c.get("display", "")) for c in _codings(code)]
    )
    return any(w in f"{words.lower()} " for w in IMAGING_WORDS)


def imaging_orders(service: HookService, context: dict[str, Any]) -> list[dict[str, Any]]:
    """The draft imaging ServiceRequests this call is about (for order-select: the selected)."""
    entries = (context.get("draftOrders") or {}).get("entry") or []
    resources = [
        e["resource"]
        for e in entries
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    ]
    orders = [r for r in resources if is_imaging_order(r)]
    if service.hook == "order-select":
        selected = set(context.get("selections") or [])
        orders = [r for r in orders if f"ServiceRequest/{r.get('id')}" in selected]
    return orders
