"""Clinical wording of numbers and errors: units as clinicians write them, which way a lab moved a
finding and why, and one plain line for an upstream failure.

The model works in canonical UCUM codes ("Cel", "10*3/uL"); a card shows "°C" and "×10³/µL".
A lab's contribution is said as its value, whether that value is high, low or within the
reference range, and which way it moved the probability ("CRP 130 mg/L, high → raises, +9 pp"),
with "pp" (percentage points of probability) defined on the card. An upstream error keeps its
technical text in the record and the logs; the card and the report get one plain line.
"""

from __future__ import annotations

import re

from mmcds.records import EvidenceSpan, LabContribution, Missing

#: UCUM code -> how a clinician writes it; codes not listed are already readable ("mg/L").
UNIT_DISPLAY: dict[str, str] = {
    "Cel": "°C",
    "[degF]": "°F",
    "10*3/uL": "×10³/µL",
    "10*9/L": "×10⁹/L",
    "10*3/mm3": "×10³/mm³",
    "/uL": "/µL",
    "ug/L": "µg/L",
    "ug/mL": "µg/mL",
    "umol/L": "µmol/L",
    "mm[Hg]": "mmHg",
    "/min": "/min",
    "%": "%",
}

#: The catalogue's short lab names -> the names clinicians use.
LAB_DISPLAY: dict[str, str] = {
    "wbc": "WBC",
    "crp": "CRP",
    "procalcitonin": "Procalcitonin",
    "lactate": "Lactate",
    "ntprobnp": "NT-proBNP",
    "troponin": "Troponin T",
    "spo2": "SpO2",
    "temperature": "Temperature",
}

#: The unit of every contribution on a card, defined once there.
PP = "pp"
PP_DEFINITION = (
    "pp = percentage points of probability: how much that input moved this finding's "
    "probability, up (+) or down (−), against the same patient without it."
)

_DIRECTION_WORDS = {"supports": "supports", "argues_against": "argues against"}


def display_unit(unit: str | None) -> str:
    """The clinical spelling of a UCUM code ("Cel" -> "°C"); empty for no unit."""
    if not unit:
        return ""
    return UNIT_DISPLAY.get(unit, unit)


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _quantity(value: float, unit: str | None) -> str:
    shown = display_unit(unit)
    # "37.5 °C", "12.1 ×10³/µL", but "97%"
    return f"{_number(value)}{'' if shown == '%' else ' '}{shown}".rstrip()


def pp(change: float) -> str:
    """A probability change in percentage points, signed; never "-0" for a tiny negative."""
    points = round(change * 100)
    return f"{'+' if points >= 0 else '−'}{abs(points)} {PP}"


def lab_state(c: LabContribution) -> str:
    """high / low / normal against the reference range (or the sender's flag), or not measured."""
    if c.value is None:
        return "not measured"
    if c.ref_low is not None and c.value < c.ref_low:
        return "low"
    if c.ref_high is not None and c.value > c.ref_high:
        return "high"
    if c.ref_low is not None or c.ref_high is not None:
        return "normal"
    flag = (c.interpretation or "").upper()
    return {"H": "high", "HH": "high", "L": "low", "LL": "low", "N": "normal"}.get(flag, "")


def lab_phrase(c: LabContribution) -> str:
    """``CRP 130 mg/L, high (ref 0–5 mg/L) → raises, +9 pp``: value, why, which way, how much."""
    name = LAB_DISPLAY.get(c.lab, c.lab)
    if c.value is None:
        head = f"{name} not measured"
    else:
        state = lab_state(c)
        head = f"{name} {_quantity(c.value, c.unit)}" + (f", {state}" if state else "")
        lo, hi = c.ref_low, c.ref_high
        if lo is not None and hi is not None:
            head += f" (ref {_number(lo)}–{_quantity(hi, c.unit)})"
    way = "raises" if c.contribution >= 0 else "lowers"
    return f"{head} → {way}, {pp(c.contribution)}"


def evidence_phrase(span: EvidenceSpan, quote: str) -> str:
    """``argues against: “No acute airspace disease.” (negated)``; "affirmed" goes unsaid."""
    status = "" if span.assertion == "affirmed" else f" ({span.assertion})"
    return f"{_DIRECTION_WORDS[span.direction]}: {quote}{status}"


# Reasons gather writes, by their opening words -> the plain line a clinician reads.
_PLAIN: tuple[tuple[str, re.Pattern[str], str], ...] = (
    (
        "image",
        re.compile(r"image \S+ unavailable|imaging studies unavailable"),
        "image not available from the PACS",
    ),
    ("image", re.compile(r"no PACS configured"), "no PACS configured, so images were not read"),
    ("image", re.compile(r"(?:image \S+|\S+) undecodable"), "image could not be decoded"),
    ("image", re.compile(r"media unavailable"), "images attached to the record could not be read"),
    (
        "image",
        re.compile(r"ImagingStudy has no DICOM study UID"),
        "imaging study without a DICOM study UID",
    ),
    (
        "text",
        re.compile(r"(?:notes|reports) unavailable"),
        "notes not available from the FHIR server",
    ),
    ("labs", re.compile(r"[\w -]*results unavailable"), "labs not available from the FHIR server"),
)
_TECHNICAL = re.compile(r"[{}<>\[\]\"]|https?://|\b(?:failed with|error) [1-5]\d\d\b")


def plain_line(text: str) -> str:
    """One line of ``text`` without a server's raw answer: cut at the first JSON/XML/URL/status
    fragment, at most 120 characters."""
    line = " ".join(text.split())
    cut = _TECHNICAL.search(line)
    if cut:
        line = line[: cut.start()].rstrip(" :;,(")
    if len(line) > 120:
        line = line[:119].rstrip() + "…"
    return line or "input could not be read"


def plain_reason(missing: Missing) -> str:
    """One plain line for what could not be used: never a server's raw answer."""
    reason = " ".join(missing.reason.split())
    for modality, pattern, words in _PLAIN:
        if missing.modality == modality and pattern.match(reason):
            return words
    rejected = re.match(r"image \S+ rejected: (.*)", reason)
    if rejected:  # the quality gate's reasons are already written for a clinician
        return plain_line(f"image not used: {rejected.group(1)}")
    return plain_line(reason)
