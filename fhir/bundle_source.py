"""A FHIR bundle file and a folder of DICOM files, read as if they were servers.

Training reads cohort folders (one transaction bundle per patient + DICOM files), the service
reads a FHIR server and a PACS. Both go through ``gather_patient`` so that the model is trained
on exactly the inputs it sees in service: the same decoders, quality gate, modality filter and
narratives. These two classes give ``gather_patient`` the reads it needs (``FhirReader``,
``InstanceReader``) over local files.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pydicom

from mmcds.fhir.client import FhirError
from mmcds.fhir.dicomweb import DicomWebError, InstanceRef


class BundleFhir:
    """Read-only FHIR reads over one patient's bundle (``Bundle.entry[].resource``).

    Resources without an ``id`` get the one their ``fullUrl`` (``urn:uuid:…``) implies, so
    references and Missing entries name something stable. Searches honour the parameters
    ``gather_patient`` uses (``patient``, ``status``, ``category``); ``_count`` is ignored (a
    server pages, and ``FhirClient.search`` follows the pages, so both see every match).
    """

    def __init__(self, bundle: dict[str, Any]) -> None:
        self._resources: list[dict[str, Any]] = []
        self._aliases: dict[str, dict[str, Any]] = {}
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource") or {}
            full_url = str(entry.get("fullUrl") or "")
            resource = {**resource, "id": resource.get("id") or full_url.removeprefix("urn:uuid:")}
            self._resources.append(resource)
            local = f"{resource.get('resourceType')}/{resource['id']}"
            for alias in (full_url, local):
                if alias:
                    self._aliases[alias] = resource
        patients = [r for r in self._resources if r.get("resourceType") == "Patient"]
        if len(patients) != 1:
            raise FhirError(f"a patient bundle holds exactly one Patient, this one {len(patients)}")
        self.patient = patients[0]

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        if resource_type == "Patient":
            return self.patient  # the bundle's one patient, whatever key the caller uses
        found = self._aliases.get(f"{resource_type}/{resource_id}")
        if found is None:
            raise FhirError(f"{resource_type}/{resource_id} is not in the bundle", 404)
        return found

    def search(self, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]:
        return [
            r
            for r in self._resources
            if r.get("resourceType") == resource_type and self._matches(r, params)
        ]

    def fetch_bytes(self, url: str) -> bytes:
        binary = self._aliases.get(url)
        if binary is None or binary.get("resourceType") != "Binary":
            raise FhirError(f"attachment {url} is not a Binary in the bundle", 404)
        return base64.b64decode(binary.get("data") or "")

    def _matches(self, resource: dict[str, Any], params: dict[str, str]) -> bool:
        status = params.get("status")
        if status is not None and resource.get("status") != status:
            return False
        category = params.get("category")
        if category is not None:
            codes = {
                coding.get("code")
                for cat in resource.get("category") or []
                for coding in cat.get("coding") or []
            }
            if category not in codes:
                return False
        return "patient" not in params or self._is_patients(resource)

    def _is_patients(self, resource: dict[str, Any]) -> bool:
        ref = (resource.get("subject") or resource.get("patient") or {}).get("reference")
        return ref is None or self._aliases.get(str(ref)) is self.patient


class LocalDicom:
    """WADO-RS ``retrieve`` over DICOM files on disk, found by SOP Instance UID."""

    def __init__(self, index: dict[str, Path]) -> None:
        self.index = index

    @classmethod
    def from_folder(cls, folder: Path) -> LocalDicom:
        """Index every ``*.dcm`` under ``folder`` (headers only)."""
        index = {}
        for path in sorted(folder.rglob("*.dcm")):
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            index[str(ds.SOPInstanceUID)] = path
        return cls(index)

    def retrieve(self, ref: InstanceRef) -> bytes:
        path = self.index.get(ref.sop_uid)
        if path is None:
            raise DicomWebError(f"no DICOM file for instance {ref.sop_uid}")
        return path.read_bytes()
