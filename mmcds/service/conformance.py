"""CDS Hooks 2.0 response rules, checked on a JSON value: what an EHR relies on.

``problems_*`` return a list of rule breaches (empty when the response conforms). The test suite
runs every response through them; they are plain functions so an integrator can run them
against a deployment too.
"""

from __future__ import annotations

import uuid
from typing import Any

INDICATORS = {"info", "warning", "critical"}
LINK_TYPES = {"absolute", "smart"}
ACTION_TYPES = {"create", "update", "delete"}
SELECTION = {"at-most-one", "any"}


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str | list | dict) and len(value) == 0)


def problems_empty(value: Any, where: str = "$") -> list[str]:
    """No ``null``, ``""``, ``[]`` or ``{}`` anywhere (CDS Hooks 2.0 §Extensions and
    conventions), the top-level ``{"cards": []}`` aside."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}"
            if _empty(item) and path != "$.cards":
                found.append(f"{path} is empty or null")
            else:
                found += problems_empty(item, path)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if _empty(item):
                found.append(f"{where}[{i}] is empty or null")
            else:
                found += problems_empty(item, f"{where}[{i}]")
    return found


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def _coding_problems(coding: Any, where: str) -> list[str]:
    if not isinstance(coding, dict) or not isinstance(coding.get("code"), str):
        return [f"{where} is not a Coding with a code"]
    return [] if isinstance(coding.get("system"), str) else [f"{where} has no system"]


def problems_card(card: Any, where: str = "card") -> list[str]:
    if not isinstance(card, dict):
        return [f"{where} is not an object"]
    found = []
    summary = card.get("summary")
    if not isinstance(summary, str) or not summary:
        found.append(f"{where}.summary is required")
    elif len(summary) >= 140:
        found.append(f"{where}.summary has {len(summary)} characters (< 140)")
    if card.get("indicator") not in INDICATORS:
        found.append(f"{where}.indicator {card.get('indicator')!r} not in {sorted(INDICATORS)}")
    source = card.get("source")
    if not isinstance(source, dict) or not isinstance(source.get("label"), str):
        found.append(f"{where}.source.label is required")
    if not _is_uuid(card.get("uuid")):
        found.append(f"{where}.uuid is missing or not a UUID")
    suggestions = card.get("suggestions")
    if suggestions is not None:
        if card.get("selectionBehavior") not in SELECTION:
            found.append(f"{where}.selectionBehavior is required with suggestions")
        for i, s in enumerate(suggestions if isinstance(suggestions, list) else []):
            found += _suggestion_problems(s, f"{where}.suggestions[{i}]")
    elif "selectionBehavior" in card:
        found.append(f"{where}.selectionBehavior without suggestions")
    for i, link in enumerate(card.get("links") or []):
        if not isinstance(link, dict) or link.get("type") not in LINK_TYPES:
            found.append(f"{where}.links[{i}].type must be absolute or smart")
        elif not (isinstance(link.get("label"), str) and isinstance(link.get("url"), str)):
            found.append(f"{where}.links[{i}] needs a label and a url")
        elif not str(link["url"]).startswith(("https://", "http://")):
            found.append(f"{where}.links[{i}].url is not an absolute URL")
    for i, reason in enumerate(card.get("overrideReasons") or []):
        found += _coding_problems(reason, f"{where}.overrideReasons[{i}]")
    return found


def _suggestion_problems(suggestion: Any, where: str) -> list[str]:
    if not isinstance(suggestion, dict) or not isinstance(suggestion.get("label"), str):
        return [f"{where}.label is required"]
    found = [] if _is_uuid(suggestion.get("uuid")) else [f"{where}.uuid is missing"]
    for i, action in enumerate(suggestion.get("actions") or []):
        at = f"{where}.actions[{i}]"
        if not isinstance(action, dict) or action.get("type") not in ACTION_TYPES:
            found.append(f"{at}.type must be one of {sorted(ACTION_TYPES)}")
            continue
        if not isinstance(action.get("description"), str):
            found.append(f"{at}.description is required")
        resource = action.get("resource")
        if action["type"] in ("create", "update") and not (
            isinstance(resource, dict) and resource.get("resourceType")
        ):
            found.append(f"{at}.resource (a FHIR resource) is required for {action['type']}")
        if action["type"] == "delete" and not action.get("resourceId"):
            found.append(f"{at}.resourceId is required for delete")
    return found


def problems_cards_response(response: Any) -> list[str]:
    if not isinstance(response, dict) or not isinstance(response.get("cards"), list):
        return ["the response has no cards array"]
    found = problems_empty(response)
    for i, card in enumerate(response["cards"]):
        found += problems_card(card, f"cards[{i}]")
    return found


def problems_discovery(response: Any) -> list[str]:
    if not isinstance(response, dict) or not isinstance(response.get("services"), list):
        return ["discovery has no services array"]
    found = problems_empty(response)
    ids = [s.get("id") for s in response["services"] if isinstance(s, dict)]
    if len(set(ids)) != len(ids):
        found.append("service ids are not unique")
    for i, service in enumerate(response["services"]):
        for member in ("id", "hook", "description"):
            if not isinstance(service.get(member), str):
                found.append(f"services[{i}].{member} is required")
        for key, template in (service.get("prefetch") or {}).items():
            if not isinstance(template, str) or not template:
                found.append(f"services[{i}].prefetch.{key} is not a query")
    return found
