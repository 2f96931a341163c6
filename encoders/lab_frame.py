"""FHIR R4 Observations -> the tidy lab frame of ``PatientRecord.labs`` (``LAB_COLUMNS``).

One row per numeric value: the Observation's own ``value[x]`` and each ``component[]`` value (a
blood pressure panel gives a systolic and a diastolic row). Catalogue labs are converted to
their canonical UCUM unit; other LOINC codes are kept with their own unit, unconverted, so the
record still shows them. Whatever cannot be used is reported as a ``Missing`` with the reason,
never raised: one bad resource must not cost the patient the rest of the record.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from mmcds.encoders.catalogue import BY_LOINC, LabSpec, to_canonical, ucum
from mmcds.records import LAB_COLUMNS, Missing

LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"
INTERPRETATION_SYSTEMS = (
    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
    "http://terminology.hl7.org/CodeSystem/v2-0078",
    "http://hl7.org/fhir/v2/0078",  # DSTU2/STU3 spelling, still sent by older interfaces
)
# Statuses whose values are results. "preliminary" is kept: clinicians act on preliminary
# results, and a later "final"/"amended" version of the same Observation replaces the row.
USABLE_STATUSES = {"final", "amended", "corrected", "preliminary", "unknown"}

# FHIR dateTime: a year, year-month, date, or date and time (offset required, tolerated absent)
_DATETIME = re.compile(
    r"\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?"
)
_FLOAT_COLUMNS = ["value", "source_value", "ref_low", "ref_high"]


@dataclass(frozen=True)
class _Code:
    loinc: str | None
    display: str | None
    spec: LabSpec | None
    others: str  # non-LOINC codings, for the reason text when there is no LOINC


def empty_lab_frame() -> pd.DataFrame:
    """A frame with ``LAB_COLUMNS`` and their dtypes and no rows."""
    return _typed(pd.DataFrame({c: [] for c in LAB_COLUMNS}))


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.reindex(columns=LAB_COLUMNS)
    for col in _FLOAT_COLUMNS:
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    for col in ("loinc", "name", "display", "unit", "source_unit", "interpretation", "reference"):
        # None, not NaN, for "absent" in text columns: `row["name"] is None` must hold
        frame[col] = frame[col].astype(object).where(frame[col].notna(), None)
    return frame


def parse_time(text: Any) -> pd.Timestamp:
    """A FHIR dateTime/instant as a UTC Timestamp; ``ValueError`` when it is not one.

    A date without a time is taken as midnight UTC. A time without an offset is invalid FHIR;
    it is read as UTC rather than dropped, since local-time senders are common and the error is
    at most the UTC offset (the feature window is days).
    """
    # pandas alone would also read "03/01/2024" (month first?): only FHIR's own format passes
    if not isinstance(text, str) or not _DATETIME.fullmatch(text.strip()):
        raise ValueError(f"not a FHIR dateTime: {text!r}")
    try:
        ts = pd.Timestamp(text.strip())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a FHIR dateTime: {text!r}") from exc
    if ts is pd.NaT:
        raise ValueError(f"not a FHIR dateTime: {text!r}")
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _observation_time(obs: Mapping[str, Any]) -> pd.Timestamp:
    period = obs.get("effectivePeriod")
    for raw in (
        obs.get("effectiveDateTime"),
        obs.get("effectiveInstant"),
        period.get("start") if isinstance(period, Mapping) else None,
        obs.get("issued"),  # when the result was released: the latest sensible stand-in
    ):
        if raw is not None:
            return parse_time(raw)
    raise ValueError("no effectiveDateTime, effectivePeriod.start or issued")


def _code(concept: Any) -> _Code:
    codings = concept.get("coding") if isinstance(concept, Mapping) else None
    codings = [c for c in codings or [] if isinstance(c, Mapping)]
    loincs = [c for c in codings if c.get("system") == LOINC_SYSTEM and c.get("code")]
    # Several LOINC codings for one value (SpO2 is often coded 2708-6 and 59408-5): one row,
    # with the first code the catalogue knows, else the first LOINC code.
    chosen = next((c for c in loincs if str(c["code"]) in BY_LOINC), loincs[0] if loincs else None)
    text = concept.get("text") if isinstance(concept, Mapping) else None
    others = ", ".join(f"{c.get('system')}|{c.get('code')}" for c in codings if c not in loincs)
    if chosen is None:
        return _Code(None, text, None, others or "none")
    code = str(chosen["code"])
    return _Code(code, chosen.get("display") or text, BY_LOINC.get(code), others)


def _quantity_unit(q: Mapping[str, Any]) -> str | None:
    # `code` is machine-readable UCUM only when the system says so; otherwise (SNOMED unit
    # codes, local codes) the human `unit` is the better guess.
    code, unit = q.get("code"), q.get("unit")
    if code and q.get("system") == UCUM_SYSTEM:
        return str(code)
    return ucum(str(unit)) if unit else (str(code) if code and not q.get("system") else None)


def _number(raw: Any) -> float | None:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return None
    value = float(raw)
    return value if math.isfinite(value) else None


def _interpretation(item: Mapping[str, Any]) -> str | None:
    for concept in item.get("interpretation") or []:
        if not isinstance(concept, Mapping):
            continue
        for coding in concept.get("coding") or []:
            if isinstance(coding, Mapping) and coding.get("system") in INTERPRETATION_SYSTEMS:
                return str(coding.get("code")) if coding.get("code") else None
    return None


def _range(item: Mapping[str, Any], spec: LabSpec | None, unit: str | None) -> tuple[float, float]:
    """(low, high) of the first reference range, in the row's unit; NaN where absent/unusable."""
    ranges = [r for r in item.get("referenceRange") or [] if isinstance(r, Mapping)]
    out = [math.nan, math.nan]
    if not ranges:
        return out[0], out[1]
    for i, key in enumerate(("low", "high")):
        q = ranges[0].get(key)
        if not isinstance(q, Mapping) or (value := _number(q.get("value"))) is None:
            continue
        # A range bound without a unit is in the value's unit (the creatinine spec example).
        q_unit = _quantity_unit(q) or unit
        if spec is None:
            out[i] = value if q_unit == unit else math.nan
            continue
        # an unconvertible bound is absent, not wrong: the catalogue range still applies
        with contextlib.suppress(ValueError):
            out[i] = to_canonical(spec, value, q_unit)
    return out[0], out[1]


class _Builder:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.missing: list[Missing] = []

    def skip(self, reason: str, reference: str | None) -> None:
        self.missing.append(Missing(modality="labs", reason=reason, reference=reference))

    def observation(self, obs: Any, position: int) -> None:
        if not isinstance(obs, Mapping):
            self.skip(f"observation #{position} is a {type(obs).__name__}, not a JSON object", None)
            return
        oid = obs.get("id")
        reference = f"Observation/{oid}" if oid else None
        if obs.get("resourceType", "Observation") != "Observation":
            self.skip(
                f"resource #{position} is a {obs.get('resourceType')}, not an Observation",
                reference,
            )
            return
        status = obs.get("status")
        code = _code(obs.get("code"))
        if status == "entered-in-error":
            # Never a result: the sender retracted it. Listing it as "missing" would put a
            # retracted value back in front of the clinician, so it is dropped silently.
            return
        if status not in USABLE_STATUSES:
            if code.spec is not None:  # a wanted lab that was ordered but never resulted
                self.skip(f"{code.spec.name} (LOINC {code.loinc}) has status {status!r}", reference)
            return
        try:
            time = _observation_time(obs)
        except ValueError as exc:
            self.skip(f"bad or absent time: {exc}", reference)
            return
        self.value(obs, code, time, reference, own=True)
        for i, comp in enumerate(obs.get("component") or []):
            if isinstance(comp, Mapping):
                self.value(comp, _code(comp.get("code")), time, reference, own=False)
            else:
                self.skip(f"component #{i} is not a JSON object", reference)

    def value(
        self,
        item: Mapping[str, Any],
        code: _Code,
        time: pd.Timestamp,
        reference: str | None,
        own: bool,
    ) -> None:
        spec = code.spec
        label = f"{spec.name} (LOINC {code.loinc})" if spec else f"LOINC {code.loinc}"
        if "valueQuantity" in item:
            q = item["valueQuantity"]
            q = q if isinstance(q, Mapping) else {}
            # A comparator ("<0.01", ">60") keeps its bound as the value: the nearest number
            # the lab gave, and dropping it would read as "not measured".
            source_value, source_unit = _number(q.get("value")), _quantity_unit(q)
        elif "valueInteger" in item:
            source_value, source_unit = _number(item["valueInteger"]), None
        else:
            # No numeric value: a panel header (hasMember/component), a coded or text result,
            # or a dataAbsentReason. Only a catalogue lab's absence is worth reporting.
            if spec is not None and ("dataAbsentReason" in item or _has_value(item)):
                why = "no numeric value" + (
                    f" (dataAbsentReason {_absent_reason(item)})"
                    if "dataAbsentReason" in item
                    else ""
                )
                self.skip(f"{label}: {why}", reference)
            return
        if source_value is None:
            self.skip(f"{label}: value is not a finite number", reference)
            return
        if code.loinc is None:
            if own or spec is not None:
                self.skip(f"numeric value without a LOINC coding (codes: {code.others})", reference)
            return
        if spec is None:
            value, unit = source_value, source_unit
        else:
            try:
                value, unit = to_canonical(spec, source_value, source_unit), spec.unit
            except ValueError as exc:
                self.skip(str(exc), reference)  # never mixed in: a wrong unit is a wrong value
                return
        low, high = _range(item, spec, source_unit if spec is None else unit)
        self.rows.append(
            {
                "loinc": code.loinc,
                "name": spec.name if spec else None,
                "display": code.display,
                "value": value,
                "unit": unit,
                "source_value": source_value,
                "source_unit": source_unit,
                "time": time,
                "ref_low": low,
                "ref_high": high,
                "interpretation": _interpretation(item),
                "reference": reference,
            }
        )


def _has_value(item: Mapping[str, Any]) -> bool:
    return any(k.startswith("value") for k in item)


def _absent_reason(item: Mapping[str, Any]) -> str:
    reason = item.get("dataAbsentReason")
    codings = reason.get("coding") if isinstance(reason, Mapping) else None
    for c in codings or []:
        if isinstance(c, Mapping) and c.get("code"):
            return str(c["code"])
    return "unspecified"


def observations_to_frame(observations: Iterable[Any]) -> tuple[pd.DataFrame, list[Missing]]:
    """FHIR R4 Observation JSON -> (frame with ``LAB_COLUMNS``, what could not be used).

    Rows are sorted by time. The same Observation seen twice (overlapping search pages, or a
    corrected version after the original) keeps only its last occurrence per code.
    """
    builder = _Builder()
    for position, obs in enumerate(observations):
        builder.observation(obs, position)
    if not builder.rows:
        return empty_lab_frame(), builder.missing
    frame = _typed(pd.DataFrame(builder.rows))
    with_ref = frame[frame["reference"].notna()]
    frame = pd.concat(
        [
            with_ref.drop_duplicates(subset=["reference", "loinc"], keep="last"),
            frame[frame["reference"].isna()],
        ]
    )
    frame = frame.sort_values(["time", "loinc"], kind="stable").reset_index(drop=True)
    return _typed(frame), builder.missing
