"""A small synchronous FHIR R4 REST client over httpx.

Errors are typed so callers can tell "the server is down" (degrade, retry later) from "the
server said no" (a clear error to the user): ``FhirUnavailable`` vs ``FhirError``.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from mmcds.errors import UpstreamError, UpstreamUnavailable

FHIR_JSON = "application/fhir+json"


class FhirError(UpstreamError):
    """The FHIR server answered, but not with what we asked for."""

    def __init__(self, message: str, status: int | None = None, outcome: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome


class FhirUnavailable(FhirError, UpstreamUnavailable):
    """The FHIR server could not be reached or timed out (or answered 5xx)."""


def _outcome_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        issues = body.get("issue") or []
        return "; ".join(
            str(i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code"))
            for i in issues
        )
    return str(body)[:300]


class FhirClient:
    """``token``: a bearer token (the hook's); ``auth``: any ``httpx.Auth`` instead (SMART
    Backend Services for write-back). ``retries``: attempts for transient failures; a 4xx is
    a real answer and is never retried."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        auth: httpx.Auth | None = None,
        timeout: float = 10.0,
        max_results: int = 1000,
        retries: int = 3,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_results = max_results
        self.retries = retries
        headers = {"Accept": FHIR_JSON}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(headers=headers, timeout=timeout, auth=auth)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        retrying = Retrying(
            retry=retry_if_exception_type(FhirUnavailable),
            stop=stop_after_attempt(max(1, self.retries)),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            reraise=True,
        )
        return retrying(self._request_once, method, url, **kwargs)

    def _request_once(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        if not url.startswith("http"):
            url = f"{self.base_url}/{url.lstrip('/')}"
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:  # refused, DNS, timeout, reset
            raise FhirUnavailable(
                f"FHIR server {self.base_url} unreachable: {type(exc).__name__}"
            ) from exc
        if response.status_code >= 500:
            raise FhirUnavailable(
                f"FHIR server error {response.status_code} on {method} {url.split('?')[0]}: "
                f"{_outcome_text(response)}",
                response.status_code,
            )
        if response.status_code >= 400:
            raise FhirError(
                f"FHIR {method} {url.split('?')[0]} failed with {response.status_code}: "
                f"{_outcome_text(response)}",
                response.status_code,
                response.json() if "json" in response.headers.get("content-type", "") else None,
            )
        return response

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"{resource_type}/{resource_id}").json()
        return result

    def search(self, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]:
        return list(self.iter_search(resource_type, params))

    def iter_search(self, resource_type: str, params: dict[str, str]) -> Iterator[dict[str, Any]]:
        """Yield matching resources, following `next` links, up to ``max_results``."""
        return self._pages(resource_type, params)

    def iter_next(self, next_url: str) -> Iterator[dict[str, Any]]:
        """The rest of a search from a Bundle's ``next`` link (e.g. a prefetched first page).
        Only links on this server are followed: the client carries the EHR's bearer token."""
        return self._pages(next_url, None)

    def _pages(self, url: str | None, query: dict[str, str] | None) -> Iterator[dict[str, Any]]:
        seen = 0
        while url:
            if url.startswith(("http://", "https://")) and not url.startswith(self.base_url + "/"):
                raise FhirError(f"next link outside the FHIR server {self.base_url} refused")
            bundle = self._request("GET", url, params=query).json()
            for entry in bundle.get("entry") or []:
                resource = entry.get("resource")
                if resource and entry.get("search", {}).get("mode", "match") == "match":
                    yield resource
                    seen += 1
                    if seen >= self.max_results:
                        return
            url = next(
                (ln["url"] for ln in bundle.get("link", []) if ln["relation"] == "next"), None
            )
            query = None  # the next link carries the query

    def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        response = self._request(
            "POST",
            resource["resourceType"],
            json=resource,
            headers={"Content-Type": FHIR_JSON},
        )
        created: dict[str, Any] = response.json()
        return created

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        response = self._request("POST", "", json=bundle, headers={"Content-Type": FHIR_JSON})
        result: dict[str, Any] = response.json()
        return result

    def fetch_bytes(self, url: str) -> bytes:
        """Raw bytes of an attachment URL: ``Binary/<id>`` or an absolute URL on this server.

        URLs elsewhere are refused: the client carries the EHR's bearer token, which must never
        travel to a host a document happened to name.
        """
        if url.startswith(("http://", "https://")) and not url.startswith(self.base_url + "/"):
            raise FhirError(f"attachment URL outside the FHIR server {self.base_url} refused")
        response = self._request("GET", url)
        if "json" in response.headers.get("content-type", ""):
            body = response.json()
            if isinstance(body, dict) and body.get("resourceType") == "Binary":
                return base64.b64decode(body.get("data") or "")
        return response.content

    def capabilities(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "metadata").json()
        return result
