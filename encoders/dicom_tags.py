"""Reading DICOM attributes defensively: numbers, text and acquisition times.

Real files carry malformed values (empty strings, bad dates, partial times); none of them may
stop an image from loading, so every helper returns a default instead of raising.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM


def acquired_at(ds: Dataset) -> datetime | None:
    """AcquisitionDateTime, else AcquisitionDate/Time, else StudyDate/Time; local time made
    aware only when TimezoneOffsetFromUTC says which zone it is."""
    tz = _utc_offset(ds)
    dt_value = ds.get("AcquisitionDateTime")
    if dt_value:
        try:
            parsed = DT(str(dt_value))
            return parsed if parsed.tzinfo or tz is None else parsed.replace(tzinfo=tz)
        except ValueError:
            pass
    for date_key, time_key in (("AcquisitionDate", "AcquisitionTime"), ("StudyDate", "StudyTime")):
        day = _parse(DA, ds.get(date_key))
        if isinstance(day, date):
            moment = _parse(TM, ds.get(time_key))
            clock = moment if isinstance(moment, time) else time()
            return datetime.combine(day, clock.replace(tzinfo=None)).replace(tzinfo=tz)
    return None


def _utc_offset(ds: Dataset) -> timezone | None:
    raw = str(ds.get("TimezoneOffsetFromUTC", "") or "").strip()
    if len(raw) != 5 or raw[0] not in "+-" or not raw[1:].isdigit():
        return None
    sign = 1 if raw[0] == "+" else -1
    return timezone(sign * timedelta(hours=int(raw[1:3]), minutes=int(raw[3:5])))


def _parse(kind: Any, value: object) -> object:
    if not value:
        return None
    try:
        return kind(str(value).strip())
    except ValueError:
        return None


def first_number(value: object) -> float:
    if isinstance(value, MultiValue | list | tuple):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def int_tag(value: object, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return default


def text_tag(ds: Dataset, keyword: str) -> str | None:
    value = str(ds.get(keyword, "") or "").strip()
    return value or None
