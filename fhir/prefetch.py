"""CDS Hooks prefetch: gather's reads answered from what the EHR sent, key by key.

Each service declares prefetch templates derived from gather's own searches
(``mmcds.fhir.gather.QUERIES``), so a prefetched key answers exactly the search gather makes.
Per key (CDS Hooks 2.0 §Prefetch): a resource or a Bundle is used as sent (a Bundle's ``next``
link is followed on the FHIR server); ``null`` or an absent key means "ask the server"; an
OperationOutcome means the EHR failed to prefetch that key, so we ask the server too. What the
server cannot give then either is recorded by gather as missing, or, for the Patient itself,
fails the call (the hook answers 412).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import urlencode

from mmcds.fhir.gather import COUNTS, QUERIES, FhirReader

PATIENT_KEY = "patient"
KeyState = Literal["used", "ask", "failed", "malformed"]


def prefetch_templates(names: tuple[str, ...] = tuple(QUERIES)) -> dict[str, str]:
    """Discovery's ``prefetch``: the Patient and each of gather's searches, by key name."""
    templates = {PATIENT_KEY: "Patient/{{context.patientId}}"}
    for name in names:
        resource_type, params = QUERIES[name]
        query = urlencode({**params, "_count": str(COUNTS.get(name, 50))}, safe="-")
        templates[name] = f"{resource_type}?patient={{{{context.patientId}}}}&{query}"
    return templates


class NextPages(Protocol):
    """Follows a Bundle's ``next`` link: ``FhirClient.iter_next``."""

    def iter_next(self, next_url: str) -> Iterator[dict[str, Any]]: ...


class PrefetchFallback(FhirReader, NextPages, Protocol):
    """The server asked for what was not prefetched: a ``FhirClient``."""


def _state(value: Any, resource_type: str) -> KeyState:
    if value is None:
        return "ask"
    if not isinstance(value, dict):
        return "malformed"
    kind = value.get("resourceType")
    if kind == "OperationOutcome":
        return "failed"
    return "used" if kind in ("Bundle", resource_type) else "malformed"


@dataclass
class PrefetchedFhir:
    """A ``FhirReader`` that answers from ``prefetch`` first and from ``server`` otherwise.

    ``states`` says per key what happened (``used`` / ``ask`` / ``failed`` / ``malformed``); a
    key that is not ``used`` was asked of the server. Keys this service did not declare are
    ignored.
    """

    prefetch: Mapping[str, Any]
    patient_id: str
    server: PrefetchFallback
    states: dict[str, KeyState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.states[PATIENT_KEY] = _state(self.prefetch.get(PATIENT_KEY), "Patient")
        for name, (resource_type, _) in QUERIES.items():
            self.states[name] = _state(self.prefetch.get(name), resource_type)

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        ours = resource_type == "Patient" and resource_id == self.patient_id
        if ours and self._used(PATIENT_KEY):
            patient = _first_patient(self.prefetch.get(PATIENT_KEY))
            if patient is not None and patient.get("id") in (None, self.patient_id):
                return patient
            self.states[PATIENT_KEY] = "malformed"  # another patient's data: never use it
        return self.server.read(resource_type, resource_id)

    def search(self, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]:
        name = _query_name(resource_type, params)
        if name is None or not self._used(name):
            return self.server.search(resource_type, params)
        bundle = self.prefetch[name]
        resources = [
            entry["resource"]
            for entry in bundle.get("entry") or []
            if isinstance(entry, dict)
            and isinstance(entry.get("resource"), dict)
            and entry["resource"].get("resourceType") == resource_type
            and (entry.get("search") or {}).get("mode", "match") == "match"
            and self._belongs(entry["resource"])
        ]
        next_url = next(
            (
                link.get("url")
                for link in bundle.get("link") or []
                if isinstance(link, dict) and link.get("relation") == "next"
            ),
            None,
        )
        if isinstance(next_url, str) and next_url:
            resources += list(self.server.iter_next(next_url))
        return resources

    def fetch_bytes(self, url: str) -> bytes:
        return self.server.fetch_bytes(url)

    def _belongs(self, resource: dict[str, Any]) -> bool:
        """Another patient's resource in a prefetch Bundle (an EHR bug) is never used."""
        ref = (resource.get("subject") or resource.get("patient") or {}).get("reference")
        return not isinstance(ref, str) or ref.split("/")[-2:] == ["Patient", self.patient_id]

    def _used(self, name: str) -> bool:
        return self.states.get(name) == "used"


def _first_patient(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict) and value.get("resourceType") == "Patient":
        return value
    if isinstance(value, dict) and value.get("resourceType") == "Bundle":
        for entry in value.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == "Patient":
                return resource
    return None


def _query_name(resource_type: str, params: dict[str, str]) -> str | None:
    """Which of gather's searches ``params`` is (``patient`` and ``_count`` aside)."""
    rest = {k: v for k, v in params.items() if k not in ("patient", "_count")}
    for name, (kind, query) in QUERIES.items():
        if kind == resource_type and query == rest:
            return name
    return None
