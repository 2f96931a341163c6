"""``mmcds worker``: runs queued analyses, with probes an orchestrator can use.

A worker serves no hooks, but Kubernetes (and compose) still need to know whether it is alive
and able to work. With ``health_port`` it serves ``/healthz``, ``/readyz`` and ``/metrics`` (the
service's own checks: database, models, FHIR server, queue; and its metrics, so the analyses a
worker runs are counted where they run) from a small uvicorn server in a side thread, while
procrastinate's worker loop keeps the main thread and its signal handlers: on SIGTERM it takes
no new job and waits up to ``shutdown_grace_s`` for the running ones (an interrupted job is
retried by the next worker; see ``WorkQueue.run_worker``).
"""

from __future__ import annotations

import logging

from mmcds.service.analysis import AnalysisService
from mmcds.service.health import start_probes, worker_probe_app
from mmcds.service.queue import QueueUnavailable
from mmcds.settings import Settings

log = logging.getLogger(__name__)


def run_worker(
    settings: Settings, *, concurrency: int = 1, burst: bool = False, health_port: int | None = None
) -> None:
    service = AnalysisService(settings)
    if service.queue is None:
        raise QueueUnavailable("no work queue: set MMCDS_QUEUE_URL to a PostgreSQL URL")
    probes = None
    if health_port:
        probes = start_probes(worker_probe_app(service, settings), settings.host, health_port)
    log.info("worker started (concurrency %d, probes on port %s)", concurrency, health_port)
    try:
        service.queue.run_worker(
            concurrency=concurrency, burst=burst, grace_s=settings.shutdown_grace_s
        )
    finally:
        if probes is not None:
            probes.should_exit = True
        log.info("worker stopped")
