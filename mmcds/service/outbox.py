"""Durable write-back: every report Bundle is stored before it is sent, and resent until it lands.

A hook enqueues the analysis's transaction Bundle under the analysis identifier, then tries to
deliver it at once. If the EHR's FHIR server is down, the row stays ``pending`` and a
background worker retries it with exponential backoff (capped), across restarts of the service,
until the server accepts it. Delivery is idempotent because the DiagnosticReport is created
with ``ifNoneExist`` on that same identifier: a resend after a lost response creates nothing new.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text, func, select, update
from sqlalchemy.exc import IntegrityError

from mmcds.db import create_tables, make_engine
from mmcds.errors import DeliveryRejected

log = logging.getLogger(__name__)

Send = Callable[[str, dict[str, Any]], str | None]  # (fhir server, bundle) -> report id
MAX_BACKOFF_S = 300.0


def _table(metadata: MetaData) -> Table:
    return Table(
        "mmcds_outbox",
        metadata,
        Column("key", String(128), primary_key=True),
        Column("fhir_server", String(1024), nullable=False),
        Column("bundle", Text, nullable=False),
        Column("status", String(16), nullable=False),  # pending | delivered | rejected
        Column("attempts", Integer, nullable=False, default=0),
        Column("next_attempt_at", Float, nullable=False),
        Column("last_error", Text),
        Column("report_id", String(128)),
        Column("created_at", Float, nullable=False),
    )


@dataclass(frozen=True)
class Delivery:
    key: str
    status: str
    attempts: int
    report_id: str | None
    last_error: str | None


class Outbox:
    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self.engine = make_engine(url, purpose="write-back outbox")
        self.table = _table(MetaData())
        create_tables(self.engine, self.table, purpose="write-back outbox")
        self._clock = clock

    def close(self) -> None:
        self.engine.dispose()

    def enqueue(self, key: str, fhir_server: str, bundle: dict[str, Any]) -> None:
        """Store a Bundle for delivery; the same key twice keeps the first (same analysis)."""
        now = self._clock()
        row = {
            "key": key,
            "fhir_server": fhir_server,
            "bundle": json.dumps(bundle),
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(self.table.insert(), row)
        except IntegrityError:
            pass  # already queued (or delivered): the report is the same analysis

    def get(self, key: str) -> Delivery | None:
        t = self.table
        with self.engine.connect() as conn:
            row = conn.execute(select(t).where(t.c.key == key)).first()
        if row is None:
            return None
        return Delivery(row.key, row.status, row.attempts, row.report_id, row.last_error)

    def pending(self) -> int:
        t = self.table
        with self.engine.connect() as conn:
            query = select(func.count()).select_from(t).where(t.c.status == "pending")
            return int(conn.execute(query).scalar_one())

    def deliver(self, send: Send, key: str | None = None) -> list[Delivery]:
        """One attempt for each due pending row (or just ``key``); returns their new state."""
        t = self.table
        now = self._clock()
        query = select(t).where(t.c.status == "pending")
        query = query.where(t.c.key == key) if key else query.where(t.c.next_attempt_at <= now)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(t.c.created_at)).all()
        results = []
        for row in rows:
            attempts = row.attempts + 1
            values: dict[str, Any]
            try:
                report_id = send(row.fhir_server, json.loads(row.bundle))
            except DeliveryRejected as exc:
                values = {"attempts": attempts, "status": "rejected", "last_error": str(exc)[:500]}
                log.error("write-back %s rejected by the FHIR server: %s", row.key, exc)
            except Exception as exc:  # transient or unknown: keep it, retry later, say why
                backoff = min(MAX_BACKOFF_S, 2.0 ** min(attempts, 16))
                values = {
                    "attempts": attempts,
                    "last_error": str(exc)[:500],
                    "next_attempt_at": self._clock() + backoff,
                }
                log.warning(
                    "write-back %s failed (attempt %d), retry in %.0f s: %s",
                    row.key,
                    attempts,
                    backoff,
                    exc,
                )
            else:
                values = {
                    "attempts": attempts,
                    "status": "delivered",
                    "report_id": report_id,
                    "last_error": None,
                }
            with self.engine.begin() as conn:
                conn.execute(update(t).where(t.c.key == row.key).values(**values))
            results.append(self.get(row.key))
        return [r for r in results if r is not None]


class OutboxWorker:
    """A daemon thread that delivers due rows every ``interval_s`` until stopped."""

    def __init__(self, outbox: Outbox, send: Send, interval_s: float = 5.0) -> None:
        self._outbox, self._send, self._interval = outbox, send, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mmcds-outbox", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._outbox.deliver(self._send)
            except Exception:  # the worker must outlive a database hiccup
                log.exception("outbox delivery round failed")
