"""The durable work queue: procrastinate on PostgreSQL, in its own schema.

One task, ``mmcds.analyse_patient(fhir_server, patient_id)``: a worker (``mmcds worker``) runs
the whole analysis (``AnalysisService.run_job``) and stores the answer a hook then serves. Jobs
are deferred by ``mmcds ingest``, by FHIR Subscription notifications (``/fhir-notify``) and by
hooks that found no current answer. Per patient, a *queueing lock* keeps at most one job waiting
(ten notifications for one patient's new labs make one analysis), and a *lock* runs one at a
time. Jobs survive restarts of service and workers (they are rows in PostgreSQL); a failed job
is retried with exponential backoff; a job left running by a worker that died is queued again
(``retry_stalled_jobs``, every minute), and succeeded jobs are deleted after a week
(``remove_old_jobs``, daily).

The queue tables live in their own schema (``MMCDS_QUEUE_SCHEMA``, default ``mmcds_queue``),
selected per connection through ``search_path``, so they never mix with the service's tables.
No token is stored in a job: the hook's token is short-lived and a secret; workers read FHIR with
the service's own access (``fhir_base_url`` allow-listed servers).
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Callable
from typing import Any

import procrastinate
import psycopg
from procrastinate.exceptions import AlreadyEnqueued
from procrastinate.schema import SchemaManager
from sqlalchemy.engine import make_url

from mmcds.errors import ConfigurationError
from mmcds.settings import Settings

log = logging.getLogger(__name__)

QUEUE = "mmcds"
TASK = "mmcds.analyse_patient"
MAINTENANCE = "mmcds-maintenance"  # its own queue: not counted as analyses waiting
RETRY_STALLED = "mmcds.retry_stalled_jobs"
STALLED_AFTER_S = 60.0  # six missed heartbeats (procrastinate beats every 10 s)
REMOVE_OLD = "mmcds.remove_old_jobs"
KEEP_FINISHED_H = 7 * 24
Handler = Callable[[str, str], object]  # (fhir server, patient id): analyse and store


class QueueUnavailable(ConfigurationError):
    """No PostgreSQL for the queue is configured, or it cannot be reached."""


def queue_conninfo(settings: Settings) -> str | None:
    """libpq URL of the queue's database: ``queue_url``, else ``database_url`` if PostgreSQL."""
    url = settings.queue_url or settings.database_url
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return None
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def _schema(settings: Settings) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", settings.queue_schema):
        raise QueueUnavailable(f"MMCDS_QUEUE_SCHEMA {settings.queue_schema!r} is not a plain name")
    return settings.queue_schema


def ensure_schema(conninfo: str, schema: str) -> None:
    """Create the schema and procrastinate's tables once; safe when processes start together."""
    try:
        with psycopg.connect(conninfo, autocommit=False) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (zlib.crc32(schema.encode()),))
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            exists = conn.execute(
                "SELECT 1 FROM pg_tables WHERE schemaname = %s"
                " AND tablename = 'procrastinate_jobs'",
                (schema,),
            ).fetchone()
            if exists is None:
                conn.execute(f'SET LOCAL search_path TO "{schema}"')
                sql = SchemaManager.get_schema()
                conn.execute(sql.encode())  # bytes: psycopg must not parse its % as params
            conn.commit()
    except psycopg.OperationalError as exc:
        raise QueueUnavailable(f"cannot reach the queue's PostgreSQL: {exc}") from exc


class WorkQueue:
    """Defers analyses (service, CLI) and runs them (workers).

    ``handler`` is what a job does; only workers need one. Open with ``open()`` (sync callers)
    or ``await open_async()`` (the service's event loop).
    """

    def __init__(self, settings: Settings, handler: Handler | None = None) -> None:
        conninfo = queue_conninfo(settings)
        if conninfo is None:
            raise QueueUnavailable(
                "the work queue needs PostgreSQL: set MMCDS_QUEUE_URL (or a PostgreSQL "
                "MMCDS_DATABASE_URL)"
            )
        self.conninfo, self.schema = conninfo, _schema(settings)
        ensure_schema(conninfo, self.schema)
        connector = procrastinate.PsycopgConnector(
            conninfo=conninfo, kwargs={"options": f"-c search_path={self.schema}"}
        )
        self.app = procrastinate.App(connector=connector)
        self._handler = handler

        @self.app.task(
            name=TASK,
            queue=QUEUE,
            retry=procrastinate.RetryStrategy(max_attempts=5, exponential_wait=2),
            pass_context=False,
        )
        def analyse_patient(fhir_server: str, patient_id: str) -> None:
            if self._handler is None:
                raise QueueUnavailable("this process defers jobs; run them with `mmcds worker`")
            self._handler(fhir_server, patient_id)

        self.task = analyse_patient

        # A worker killed mid-job (SIGKILL after its grace, OOM, a lost node) leaves the job
        # "doing" for ever; once that worker's heartbeat is stale, any worker hands it back.
        @self.app.periodic(cron="* * * * *", periodic_id="retry-stalled")
        @self.app.task(
            name=RETRY_STALLED, queue=MAINTENANCE, queueing_lock=RETRY_STALLED, pass_context=False
        )
        async def retry_stalled_jobs(timestamp: int) -> None:
            await self.retry_stalled(STALLED_AFTER_S)

        # Finished jobs are rows too (the sweep alone adds 1,440 a day): succeeded ones go
        # after a week; failed ones stay for an operator to look at.
        @self.app.periodic(cron="17 4 * * *", periodic_id="remove-old-jobs")
        @self.app.task(
            name=REMOVE_OLD, queue=MAINTENANCE, queueing_lock=REMOVE_OLD, pass_context=False
        )
        async def remove_old_jobs(timestamp: int) -> None:
            await self.app.job_manager.delete_old_jobs(nb_hours=KEEP_FINISHED_H)

    def _deferrer(self, fhir_server: str, patient_id: str) -> Any:
        key = f"{fhir_server}|{patient_id}"
        return self.task.configure(queueing_lock=key, lock=key)

    def defer(self, fhir_server: str, patient_id: str) -> bool:
        """Queue the patient's analysis; False when one is already waiting."""
        try:
            self._deferrer(fhir_server, patient_id).defer(
                fhir_server=fhir_server, patient_id=patient_id
            )
        except AlreadyEnqueued:
            return False
        return True

    async def defer_async(self, fhir_server: str, patient_id: str) -> bool:
        try:
            await self._deferrer(fhir_server, patient_id).defer_async(
                fhir_server=fhir_server, patient_id=patient_id
            )
        except AlreadyEnqueued:
            return False
        return True

    async def retry_stalled(self, seconds_since_heartbeat: float) -> int:
        """Queue again the analyses left "doing" by workers silent for that long (or gone);
        how many. Procrastinate's workers beat every 10 s, so less than that would take jobs
        from live workers."""
        manager = self.app.job_manager
        stalled = await manager.get_stalled_jobs(
            task_name=TASK, seconds_since_heartbeat=seconds_since_heartbeat
        )
        count = 0
        for job in stalled:
            log.warning("job %s of a stopped worker is queued again", job.id)
            await manager.retry_job(job)
            count += 1
        return count

    def open(self) -> WorkQueue:
        self.app.open()
        return self

    def close(self) -> None:
        self.app.close()

    async def open_async(self) -> None:
        await self.app.open_async()

    async def close_async(self) -> None:
        await self.app.close_async()

    def run_worker(
        self, *, concurrency: int = 1, burst: bool = False, grace_s: float | None = None
    ) -> None:
        """Run jobs until stopped (or, ``burst``, until the queue is empty). On SIGTERM or
        SIGINT no new job starts and running ones get ``grace_s`` (None: all the time they
        need) to finish."""
        self.app.run_worker(
            queues=[QUEUE, MAINTENANCE],
            concurrency=concurrency,
            wait=not burst,
            install_signal_handlers=not burst,
            shutdown_graceful_timeout=grace_s,
        )

    async def run_worker_async(self, *, concurrency: int = 1, burst: bool = False) -> None:
        await self.app.run_worker_async(
            queues=[QUEUE, MAINTENANCE],
            concurrency=concurrency,
            wait=not burst,
            install_signal_handlers=False,
        )

    def counts(self) -> dict[str, int]:
        """Jobs by status (todo, doing, succeeded, failed...), for monitoring and tests."""
        with psycopg.connect(self.conninfo) as conn:
            rows = conn.execute(
                f'SELECT status::text, count(*) FROM "{self.schema}".procrastinate_jobs '
                "WHERE task_name = %s GROUP BY status",
                (TASK,),
            ).fetchall()
        return {status: int(n) for status, n in rows}

    def depth(self) -> dict[str, int]:
        """Jobs waiting (``todo``) per queue, ours shown at 0 too: ``mmcds_queue_depth``. Read
        from the queue's table at scrape time, so every replica reports the same truth."""
        with psycopg.connect(self.conninfo, connect_timeout=3) as conn:
            rows = conn.execute(
                f'SELECT queue_name, count(*) FROM "{self.schema}".procrastinate_jobs '
                "WHERE status = 'todo' GROUP BY queue_name"
            ).fetchall()
        return {QUEUE: 0} | {str(queue): int(n) for queue, n in rows}

    def check(self) -> str | None:
        """Readiness: the queue's database answers and its tables are there (no secret in the
        reason)."""
        try:
            self.depth()
        except psycopg.Error as exc:
            return f"queue unreachable ({type(exc).__name__})"
        return None
