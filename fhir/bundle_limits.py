"""Reports that fit real FHIR servers: review-sized overlays and bundle size limits.

Servers cap what they take: Medplum refuses any string over 1 MB (a base64 ``Binary.data`` or
``Media.content.data``), proxies and HAPI FHIR cap request bodies. A report refused for its
size is a lost report, so the bundle is measured against ``BundleLimits`` before it is stored
and sent, and when it does not fit (or a server still answers 413 for it) it *degrades*: the
saliency overlays are left out and the report's conclusion says so (they stay on the review
page). Only a report that does not fit even without them is an error.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from mmcds.errors import InputRejected
from mmcds.explain.overlay import LEGEND_W, fit_png

#: Resource types that carry the overlays; everything else is the report proper.
OVERLAY_TYPES = ("Binary", "Media")
OMITTED_PREFIX = "Saliency overlays were left out of this report"


class BundleTooLarge(InputRejected):
    """The report does not fit the server's limits even without its overlays."""


@dataclass(frozen=True)
class BundleLimits:
    """What the receiving server accepts. Defaults fit Medplum (1 MB per string) and a common
    8 MB request cap; set them from the server's documentation (``MMCDS_WRITEBACK_MAX_*``)."""

    max_bundle_bytes: int = 8_000_000
    max_string_bytes: int = 1_000_000
    overlay_max_side: int = 1024


def review_png(png: bytes, limits: BundleLimits) -> bytes:
    """``png`` at most ``overlay_max_side`` px on its longest side, and small enough that its
    base64 fits one string: re-encoded (``fit_png``) only when it is not already (overlays are
    composed to the default budget, so only a stricter server's limits re-encode them)."""
    budget = limits.max_string_bytes * 3 // 4 - 64  # base64 is 4/3 of the bytes
    with Image.open(io.BytesIO(png)) as im:
        # the image part is what the side limit is for: an overlay is the image + its legend
        sides = (im.width - LEGEND_W, im.height)
        if max(sides) <= limits.overlay_max_side and len(png) <= budget:
            return png
        img = im.convert("RGB")
    img.thumbnail((limits.overlay_max_side, limits.overlay_max_side), Image.Resampling.LANCZOS)
    return fit_png(img, budget)


def _strings(node: Any, path: str) -> Iterator[tuple[str, int]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value, path)
    elif isinstance(node, str):
        yield path, len(node.encode())


def oversize(bundle: dict[str, Any], limits: BundleLimits) -> str | None:
    """Why ``bundle`` does not fit ``limits``, or None when it does."""
    size = len(json.dumps(bundle, separators=(",", ":")).encode())
    if size > limits.max_bundle_bytes:
        return f"bundle of {size} bytes over the limit of {limits.max_bundle_bytes}"
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") or {}
        for path, length in _strings(resource, str(resource.get("resourceType"))):
            if length > limits.max_string_bytes:
                return f"{path} of {length} bytes over the limit of {limits.max_string_bytes}"
    return None


def has_overlays(bundle: dict[str, Any]) -> bool:
    return any(
        (e.get("resource") or {}).get("resourceType") in OVERLAY_TYPES
        for e in bundle.get("entry") or []
    )


def without_overlays(bundle: dict[str, Any], reason: str) -> dict[str, Any]:
    """A copy of ``bundle`` without the overlay Binary/Media, the report saying why."""
    out = copy.deepcopy(bundle)
    out["entry"] = [e for e in out["entry"] if e["resource"]["resourceType"] not in OVERLAY_TYPES]
    for entry in out["entry"]:
        report = entry["resource"]
        if report["resourceType"] == "DiagnosticReport":
            report.pop("media", None)
            note = f"{OMITTED_PREFIX} ({reason}); they are on the review page."
            report["conclusion"] = f"{report.get('conclusion', '')} {note}".strip()
    return out


def fit_bundle(bundle: dict[str, Any], limits: BundleLimits) -> dict[str, Any]:
    """``bundle`` if it fits, else the same without overlays; ``BundleTooLarge`` if not even."""
    why = oversize(bundle, limits)
    if why is None:
        return bundle
    if has_overlays(bundle):
        smaller = without_overlays(bundle, f"too large for the FHIR server: {why}")
        if oversize(smaller, limits) is None:
            return smaller
    raise BundleTooLarge(f"the report does not fit the FHIR server's limits: {why}")
