"""Durable write-back: every report Bundle is stored before it is sent, and resent until it lands.

A hook enqueues the analysis's transaction Bundle under a key (FHIR server + analysis
identifier), then tries to deliver it at once. States, and what moves a report between them:

- ``pending``: not delivered yet; retried with exponential backoff (2 s doubling to 5 min),
  across restarts, while the server is down, slow, answers 5xx or a transient 4xx.
- ``delivered``: the server holds the report (``report_id``); ``note`` says if it went
  without its overlays or was found already written.
- ``rejected``: the server refused the Bundle itself (a 4xx that resending cannot cure);
  ``last_error`` has the server's reason. Logged at error level; ``mmcds outbox --retry KEY``
  re-drives it after a fix.
- ``dead``: still failing after ``max_attempts`` (the retry budget); logged at error level,
  re-driven the same way.

Exactly once: an attempt first *claims* the row (an atomic UPDATE with a lease), so two
workers on one database never send the same report at the same time; a worker killed between
sending and recording success leaves a lease that expires, and the next attempt finds the
report already on the server (``send_bundle`` searches its identifier first).

Counter ``mmcds_outbox_reports_total{state}`` (prometheus-client, default registry): one count
per report entering ``pending`` (queued), ``delivered``, ``rejected`` or ``dead``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter
from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

from mmcds.db import create_tables, make_engine
from mmcds.errors import DeliveryRejected
from mmcds.fhir.writeback import Sent

log = logging.getLogger(__name__)

Send = Callable[[str, dict[str, Any]], Sent]  # (fhir server, bundle) -> what landed
MAX_BACKOFF_S = 300.0
#: ~25 hours of retries at the 5-minute cap: an EHR outage over a weekend night is survived.
DEFAULT_MAX_ATTEMPTS = 300
#: How long an attempt may hold a row; longer than any send (timeouts are seconds).
LEASE_S = 120.0
STATES = ("pending", "delivered", "rejected", "dead")

REPORTS = Counter(
    "mmcds_outbox_reports",
    "Write-back reports entering each outbox state (pending = queued)",
    ["state"],
)


def _table(metadata: MetaData) -> Table:
    return Table(
        "mmcds_outbox",
        metadata,
        Column("key", String(128), primary_key=True),
        Column("fhir_server", String(1024), nullable=False),
        Column("bundle", Text, nullable=False),
        Column("status", String(16), nullable=False),  # one of STATES
        Column("attempts", Integer, nullable=False, default=0),
        Column("next_attempt_at", Float, nullable=False),
        Column("last_error", Text),
        Column("report_id", String(128)),
        Column("created_at", Float, nullable=False),
        Column("claimed_until", Float),
        Column("note", Text),
        Column("updated_at", Float),
    )


#: Columns added after the first release: added in place to an existing table.
_LATER_COLUMNS = {"claimed_until": "FLOAT", "note": "TEXT", "updated_at": "FLOAT"}


@dataclass(frozen=True)
class Delivery:
    key: str
    status: str
    attempts: int
    report_id: str | None
    last_error: str | None
    note: str | None = None
    fhir_server: str = ""
    created_at: float = 0.0
    next_attempt_at: float = 0.0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS


class Outbox:
    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self.engine = make_engine(url, purpose="write-back outbox")
        self.table = _table(MetaData())
        create_tables(self.engine, self.table, purpose="write-back outbox")
        self._add_missing_columns()
        self._clock = clock
        self.max_attempts = max_attempts

    def _add_missing_columns(self) -> None:
        with self.engine.begin() as conn:
            have = {c["name"] for c in inspect(conn).get_columns(self.table.name)}
            for name, sql_type in _LATER_COLUMNS.items():
                if name not in have:
                    conn.execute(
                        text(f"ALTER TABLE {self.table.name} ADD COLUMN {name} {sql_type}")
                    )

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
            "updated_at": now,
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(self.table.insert(), row)
        except IntegrityError:
            return  # already queued (or delivered): the report is the same analysis
        REPORTS.labels(state="pending").inc()

    def _delivery(self, row: Any) -> Delivery:
        return Delivery(
            row.key,
            row.status,
            row.attempts,
            row.report_id,
            row.last_error,
            row.note,
            row.fhir_server,
            row.created_at,
            row.next_attempt_at,
            self.max_attempts,
        )

    def get(self, key: str) -> Delivery | None:
        t = self.table
        with self.engine.connect() as conn:
            row = conn.execute(select(t).where(t.c.key == key)).first()
        return None if row is None else self._delivery(row)

    def pending(self) -> int:
        return self.counts().get("pending", 0)

    def counts(self) -> dict[str, int]:
        """Reports per state, for monitoring."""
        t = self.table
        with self.engine.connect() as conn:
            rows = conn.execute(select(t.c.status, func.count()).group_by(t.c.status)).all()
        return {str(status): int(n) for status, n in rows}

    def deliveries(self, states: tuple[str, ...] = STATES, limit: int = 100) -> list[Delivery]:
        """The newest ``limit`` reports in ``states``."""
        t = self.table
        query = select(t).where(t.c.status.in_(states)).order_by(t.c.created_at.desc())
        with self.engine.connect() as conn:
            return [self._delivery(r) for r in conn.execute(query.limit(limit)).all()]

    def retry(self, key: str) -> Delivery | None:
        """Make ``key`` due again with a fresh retry budget (after an operator's fix)."""
        t = self.table
        values = {
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": self._clock(),
            "claimed_until": None,
            "updated_at": self._clock(),
        }
        query = update(t).where(t.c.key == key, t.c.status != "delivered").values(**values)
        with self.engine.begin() as conn:
            changed = conn.execute(query).rowcount
        if changed:
            log.warning("write-back %s re-driven by an operator", key)
            REPORTS.labels(state="pending").inc()
        return self.get(key)

    def _claim(self, key: str) -> bool:
        """Take the row for one attempt; False if another worker holds it or it is settled."""
        t, now = self.table, self._clock()
        query = (
            update(t)
            .where(t.c.key == key, t.c.status == "pending")
            .where(or_(t.c.claimed_until.is_(None), t.c.claimed_until < now))
            .values(claimed_until=now + LEASE_S)
        )
        with self.engine.begin() as conn:
            return bool(conn.execute(query).rowcount)

    def deliver(self, send: Send, key: str | None = None) -> list[Delivery]:
        """One attempt for each due pending row (or just ``key``, due or not); their new state.
        A row another worker is sending right now is skipped."""
        t = self.table
        query = select(t.c.key).where(t.c.status == "pending")
        if key:
            query = query.where(t.c.key == key)
        else:
            query = query.where(t.c.next_attempt_at <= self._clock())
        with self.engine.connect() as conn:
            keys = [r.key for r in conn.execute(query.order_by(t.c.created_at)).all()]
        results = []
        for k in keys:
            if not self._claim(k):
                continue
            with self.engine.connect() as conn:
                row = conn.execute(select(t).where(t.c.key == k)).one()
            values = self._attempt(send, row)
            values |= {"claimed_until": None, "updated_at": self._clock()}
            with self.engine.begin() as conn:
                conn.execute(update(t).where(t.c.key == k).values(**values))
            if values.get("status") in ("delivered", "rejected", "dead"):
                REPORTS.labels(state=values["status"]).inc()
            delivery = self.get(k)
            if delivery is not None:
                results.append(delivery)
        return results

    def _attempt(self, send: Send, row: Any) -> dict[str, Any]:
        """Send one row; the column values that record the outcome."""
        attempts = row.attempts + 1
        try:
            sent = send(row.fhir_server, json.loads(row.bundle))
        except DeliveryRejected as exc:
            log.error("write-back %s rejected by the FHIR server: %s", row.key, exc)
            return {"attempts": attempts, "status": "rejected", "last_error": str(exc)[:2000]}
        except Exception as exc:  # transient or unknown: keep it, retry later, say why
            error = f"{type(exc).__name__}: {exc}"[:2000]
            if attempts >= self.max_attempts:
                log.error(
                    "write-back %s dead after %d attempts, no more retries: %s",
                    row.key,
                    attempts,
                    error,
                )
                return {"attempts": attempts, "status": "dead", "last_error": error}
            backoff = min(MAX_BACKOFF_S, 2.0 ** min(attempts, 16))
            log.warning(
                "write-back %s failed (attempt %d of %d), retry in %.0f s: %s",
                row.key,
                attempts,
                self.max_attempts,
                backoff,
                error,
            )
            return {
                "attempts": attempts,
                "last_error": error,
                "next_attempt_at": self._clock() + backoff,
            }
        if sent.note:
            log.info("write-back %s delivered (%s)", row.key, sent.note)
        return {
            "attempts": attempts,
            "status": "delivered",
            "report_id": sent.report_id,
            "last_error": None,
            "note": sent.note,
        }


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
