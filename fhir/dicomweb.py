"""DICOMweb (PS3.18) client: QIDO-RS search, WADO-RS retrieve, STOW-RS store.

Instances travel as ``multipart/related; type="application/dicom"``. Retrieval asks for
``transfer-syntax=*`` so the PACS sends what it stores; decoding (and a clear error for syntaxes
we cannot decode) is the image encoder's job, not the PACS's.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from mmcds.errors import UpstreamError, UpstreamUnavailable

DICOM_MULTIPART = 'multipart/related; type="application/dicom"'


class DicomWebError(UpstreamError):
    """The PACS answered with an error, or with something that is not DICOM."""


class DicomWebUnavailable(DicomWebError, UpstreamUnavailable):
    """The PACS could not be reached, timed out, or answered 5xx."""


@dataclass(frozen=True)
class InstanceRef:
    study_uid: str
    series_uid: str
    sop_uid: str


def _boundary(content_type: str) -> bytes:
    for part in content_type.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "boundary":
            return value.strip('"').encode()
    raise DicomWebError(f"multipart response without a boundary: {content_type!r}")


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The payloads of a multipart/related body (RFC 2046), headers stripped."""
    delimiter = b"--" + _boundary(content_type)
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise DicomWebError("malformed multipart part: no header/body separator")
        # Each part ends with the CRLF that belongs to the next delimiter line.
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


_retry_transient = retry(
    retry=retry_if_exception_type(DicomWebUnavailable),
    stop=stop_after_attempt(3),
    wait=wait_exponential(multiplier=0.2, max=2.0),
    reraise=True,
)


class DicomWebClient:
    def __init__(
        self,
        base_url: str,
        *,
        auth: tuple[str, str] | None = None,
        timeout: float = 30.0,
        max_bytes: int = 64_000_000,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_bytes = max_bytes
        self._http = httpx.Client(auth=auth, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @_retry_transient
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        # Orthanc does not percent-decode query strings, so QIDO wildcards must go unescaped:
        # callers pass prepared paths rather than params.
        try:
            response = self._http.request(method, f"{self.base_url}/{path.lstrip('/')}", **kwargs)
        except httpx.TransportError as exc:
            raise DicomWebUnavailable(
                f"PACS {self.base_url} unreachable: {type(exc).__name__}"
            ) from exc
        if response.status_code >= 500:
            raise DicomWebUnavailable(f"PACS error {response.status_code} on {method} {path}")
        if response.status_code >= 400:
            raise DicomWebError(
                f"PACS {method} {path} failed with {response.status_code}: {response.text[:200]}"
            )
        return response

    def instances(self, study_uid: str) -> list[InstanceRef]:
        """QIDO-RS: every instance of a study (empty if the PACS has none)."""
        response = self._request(
            "GET", f"studies/{study_uid}/instances", headers={"Accept": "application/dicom+json"}
        )
        if response.status_code == 204 or not response.content:
            return []
        refs = []
        for item in response.json():
            refs.append(
                InstanceRef(
                    study_uid=item["0020000D"]["Value"][0],
                    series_uid=item["0020000E"]["Value"][0],
                    sop_uid=item["00080018"]["Value"][0],
                )
            )
        return refs

    def retrieve(self, ref: InstanceRef) -> bytes:
        """WADO-RS: one instance as Part 10 bytes, in whatever transfer syntax the PACS holds."""
        response = self._request(
            "GET",
            f"studies/{ref.study_uid}/series/{ref.series_uid}/instances/{ref.sop_uid}",
            headers={"Accept": f"{DICOM_MULTIPART}; transfer-syntax=*"},
        )
        if len(response.content) > self.max_bytes:
            raise DicomWebError(
                f"instance {ref.sop_uid} is {len(response.content)} bytes, over the "
                f"{self.max_bytes}-byte limit (MMCDS_MAX_IMAGE_BYTES)"
            )
        parts = split_multipart(response.content, response.headers.get("content-type", ""))
        if len(parts) != 1:
            raise DicomWebError(f"expected one instance for {ref.sop_uid}, got {len(parts)}")
        return parts[0]

    def store(self, instances: Iterable[bytes]) -> dict[str, Any]:
        """STOW-RS: store Part 10 files; returns the PACS's response (DICOM JSON)."""
        boundary = uuid.uuid4().hex
        body = bytearray()
        for data in instances:
            body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            body += data + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        response = self._request(
            "POST",
            "studies",
            content=bytes(body),
            headers={
                "Content-Type": f"{DICOM_MULTIPART}; boundary={boundary}",
                "Accept": "application/dicom+json",
            },
        )
        result: dict[str, Any] = response.json() if response.content else {}
        failed = (result.get("00081198") or {}).get("Value") or []  # FailedSOPSequence
        if failed:
            raise DicomWebError(f"PACS refused {len(failed)} instance(s)")
        return result
