"""Logs a log pipeline can parse: one JSON object a line, each with the request id it belongs to.

The rule (DESIGN §6) is that no token and no PHI ever reaches a log. The code keeps it by what
it logs (request ids, ``jti``, counts, never note text, names or identifiers); this module adds
three nets under it: HTTP client loggers that print request URLs (which carry patient ids in
FHIR searches) are held at WARNING, the work queue's job records lose their arguments (patient
ids), and anything shaped like a bearer token or a JWT is masked before a line is written.
``tests/service/test_operations.py`` runs a hook and scans what came out (and
``test_operations_queue.py`` the queued path).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import uuid
from datetime import UTC, datetime
from typing import IO, Any, Literal

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mmcds_request_id", default=None
)

# An id a caller may choose (X-Request-ID), bounded so it cannot smuggle data into the log.
_CALLER_ID = re.compile(r"^[A-Za-z0-9._:-]{8,64}$")
_SECRETS = (
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+"), "Bearer [redacted]"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), "[jwt redacted]"),
    (
        re.compile(r"(?i)(access_token|client_secret|password)(['\"]?\s*[:=]\s*['\"]?)[^\s'\",&]+"),
        r"\1\2[redacted]",
    ),
)
# Loggers of libraries that print full request URLs (and so patient ids) at INFO.
QUIET_LOGGERS = ("httpx", "httpcore", "urllib3")
# The standard LogRecord attributes; anything else on a record came from ``extra=``.
# (uvicorn adds `color_message`, the same text with terminal colours.)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


# procrastinate logs each job as ``task[id](fhir_server='…', patient_id='…')`` and puts the
# job (its arguments and its lock, both naming the patient) in the record's extras.
_JOB_CALL = re.compile(r"\b([\w.]+\[\d+\])\([^()]*\)")
_JOB_FIELDS = ("id", "status", "task_name", "queue", "queue_name", "attempts", "scheduled_at")


def _job_without_arguments(job: Any) -> Any:
    return {k: v for k, v in job.items() if k in _JOB_FIELDS} if isinstance(job, dict) else None


class JobArguments(logging.Filter):
    """Cuts queue jobs down to task, id and state on procrastinate's log records: its job
    arguments are patient ids, and a patient id is an identifier (PHI)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("procrastinate"):
            record.msg, record.args = _JOB_CALL.sub(r"\1", record.getMessage()), None
            extras = vars(record)  # procrastinate's ``extra=`` fields
            if "job" in extras:
                extras["job"] = _job_without_arguments(extras["job"])
            if isinstance(extras.get("jobs"), list):
                extras["jobs"] = [_job_without_arguments(j) for j in extras["jobs"]]
        return True


def new_request_id(offered: str | None = None) -> str:
    """The caller's X-Request-ID if it is a plain, bounded token; a fresh UUID otherwise."""
    if offered and _CALLER_ID.match(offered):
        return offered
    return str(uuid.uuid4())


def redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, int | float | bool) else redact(str(value))
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = request_id_var.get()
        line = redact(super().format(record))
        return f"{line} [request {request_id}]" if request_id else line


def configure_logging(
    level: str | int = "INFO",
    fmt: Literal["json", "text"] = "json",
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Route every logger (uvicorn's included) through one handler on the root logger; returns
    that handler (tests read what it wrote)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(JobArguments())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    return handler
