"""Identifiers derived from the seed: DICOM UIDs, FHIR fullUrl UUIDs, accession numbers."""

from __future__ import annotations

import hashlib
import uuid


def _digest(seed: int, *parts: object) -> bytes:
    text = "|".join(["mmcds-synth", str(seed), *map(str, parts)])
    return hashlib.sha256(text.encode()).digest()


def dicom_uid(seed: int, *parts: object) -> str:
    """A ``2.25.<128-bit integer>`` UID (ISO/IEC 9834-8 form, at most 44 characters)."""
    return "2.25." + str(int.from_bytes(_digest(seed, *parts)[:16], "big"))


def urn_uuid(seed: int, *parts: object) -> str:
    return "urn:uuid:" + str(uuid.UUID(bytes=_digest(seed, *parts)[:16], version=4))


def accession(seed: int, key: str) -> str:
    return "SYN" + str(int.from_bytes(_digest(seed, key, "accession")[:6], "big"))[-10:]
