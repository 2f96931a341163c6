"""Reading a JSON request body an attacker may have shaped.

``json.loads`` alone lets three kinds of body through or blows up on them: nesting deep enough to
raise ``RecursionError`` (which is not a ``ValueError`` and used to escape as a 500), numbers of
thousands of digits (slow to convert; ``inf`` for floats), and duplicate keys (the last silently
wins, so two readers of the same bytes may disagree). Each gets a ``BodyRejected`` with a message
instead, and so does a body that is not declared as JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any

from mmcds.errors import InputRejected

MAX_DEPTH = 64  # CDS Hooks requests nest FHIR resources; real ones stay well under 30 levels
MAX_NUMBER_CHARS = 64
JSON_TYPES = ("application/json", "application/fhir+json")


class BodyRejected(InputRejected):
    """The request body cannot be read as the JSON object the endpoint expects."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BodyRejected(f"duplicate key {key[:40]!r} in a JSON object")
        result[key] = value
    return result


def _number(text: str) -> float | int:
    if len(text) > MAX_NUMBER_CHARS:
        raise BodyRejected(f"a number of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
    if any(c in text for c in ".eE"):
        value = float(text)
        if not math.isfinite(value):
            raise BodyRejected(f"number {text[:20]} is out of range")
        return value
    return int(text)


def _constant(name: str) -> Any:
    raise BodyRejected(f"{name} is not JSON")


def _depth(value: Any) -> int:
    """Nesting depth, iteratively (the parsed value may be ~1000 levels deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def parse_json_object(body: bytes, content_type: str | None) -> dict[str, Any]:
    """The body as a JSON object, or ``BodyRejected`` saying why not."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind not in JSON_TYPES:
        raise BodyRejected(f"Content-Type must be application/json, not {kind[:60] or 'absent'!r}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyRejected(f"body is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    try:
        value = json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_int=_number,
            parse_float=_number,
            parse_constant=_constant,
        )
    except RecursionError as exc:
        raise BodyRejected(f"JSON nested too deeply (at most {MAX_DEPTH} levels)") from exc
    except BodyRejected:
        raise
    except ValueError as exc:
        raise BodyRejected(f"body is not valid JSON: {exc}") from exc
    if _depth(value) > MAX_DEPTH:
        raise BodyRejected(f"JSON nested too deeply (at most {MAX_DEPTH} levels)")
    if not isinstance(value, dict):
        raise BodyRejected(f"body must be a JSON object, not {type(value).__name__}")
    return value
