"""Send a report transaction Bundle to the EHR's FHIR server (the outbox's ``Send``)."""

from __future__ import annotations

from typing import Any

from mmcds.errors import DeliveryRejected
from mmcds.fhir.client import FhirClient, FhirError, FhirUnavailable
from mmcds.fhir.report import written_report_id


def send_bundle(fhir_server: str, bundle: dict[str, Any], *, timeout_s: float = 10.0) -> str | None:
    """POST the transaction; the DiagnosticReport id on success.

    Unreachable or 5xx: ``FhirUnavailable`` propagates and the outbox retries. Any other
    refusal (a 4xx: the Bundle itself is wrong) raises ``DeliveryRejected``: resending cannot help.
    """
    # Written without the hook's token: that token is short-lived and belongs to the user's
    # session. SMART Backend Services credentials for write-back are planned (DESIGN §5).
    with FhirClient(fhir_server, timeout=timeout_s) as client:
        try:
            return written_report_id(client.transaction(bundle))
        except FhirUnavailable:
            raise
        except FhirError as exc:
            raise DeliveryRejected(str(exc)) from exc
