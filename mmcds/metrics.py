"""The service's Prometheus metrics, defined once, in the process's default registry.

This module sits at the bottom of the layers so the code where an event happens (the embedding
cache, the hook handler, the write-back outbox, the queue) counts it where it happens; the
service exposes the default registry at ``/metrics`` (``mmcds.service.health``), so a counter
another module registers there (e.g. the outbox's) is scraped too. What each metric means, and
the PromQL for the rates, is in the README's "Operating it" section.

Labels are bounded sets (service ids, finding names, fixed outcome words): never a patient,
a URL or anything else a request chooses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# CDS Hooks asks for answers "on the order of 500 ms": buckets resolve well below and above it.
HOOK_SECONDS = Histogram(
    "mmcds_hook_duration_seconds",
    "Time from a hook request's first byte to its response, per CDS service.",
    ["service"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
HOOK_RESPONSES = Counter(
    "mmcds_hook_responses_total",
    "Hook responses per CDS service and HTTP status code.",
    ["service", "code"],
)
HOOKS_IN_FLIGHT = Gauge(
    "mmcds_hooks_in_flight",
    "Hook requests being answered right now (a draining instance waits for this to reach 0).",
)
CACHE_LOOKUPS = Counter(
    "mmcds_embedding_cache_lookups_total",
    "Embedding cache lookups by result (hit or miss); hit rate = hit / (hit + miss).",
    ["result"],
)
#: ``outcome`` is the card level of an assessed finding (info, warning, critical) or why it was
#: not assessed (abstained, not_validated, insufficient_inputs).
FINDING_OUTCOMES = Counter(
    "mmcds_finding_outcomes_total",
    "Findings shown on hook cards, per finding and outcome.",
    ["finding", "outcome"],
)
#: CDS Hooks feedback on cards: ``accepted`` or ``overridden`` (the override reasons are in the
#: feedback store, not in a label).
CARD_FEEDBACK = Counter(
    "mmcds_card_feedback_total",
    "CDS Hooks feedback received on cards, by outcome.",
    ["outcome"],
)
OUTBOX_STATES = ("pending", "delivered", "rejected", "dead")


class _ReadAtScrape(Collector):
    """A gauge family read from the database at scrape time (``source`` gives label value ->
    count), so the figure is the durable truth across restarts and every worker, not what this
    process happened to see. ``always`` are label values shown even at 0 (a rate or an alert on
    a series that never appeared would not fire)."""

    def __init__(self, name: str, documentation: str, label: str, always: tuple[str, ...]):
        self.name, self.documentation, self.label, self.always = name, documentation, label, always
        self.source: Callable[[], dict[str, int]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=[self.label])
        try:
            counts = self.source() if self.source is not None else {}
        except Exception as exc:  # a database that is down must not fail the whole scrape
            log.warning("%s not read: %s", self.name, type(exc).__name__)
            return  # the series goes absent: alert on absent(...); /readyz says why
        for value in sorted(set(self.always) | set(counts)):
            family.add_metric([value], float(counts.get(value, 0)))
        yield family


OUTBOX_REPORTS = _ReadAtScrape(
    "mmcds_outbox_reports_by_state",
    "Report bundles in the write-back outbox, by state.",
    "state",
    OUTBOX_STATES,
)
#: Jobs waiting (procrastinate status ``todo``) per queue, counted in the queue's tables: a job
#: deferred by any replica or ``mmcds ingest`` and not yet taken by any worker.
QUEUE_DEPTH = _ReadAtScrape(
    "mmcds_queue_depth",
    "Jobs waiting in the background work queue, per queue.",
    "queue",
    (),
)
REGISTRY.register(OUTBOX_REPORTS)
REGISTRY.register(QUEUE_DEPTH)


def set_outbox_source(source: Callable[[], dict[str, int]] | None) -> None:
    """Where ``mmcds_outbox_reports_by_state`` reads its counts (the running app's outbox)."""
    OUTBOX_REPORTS.source = source


def set_queue_source(source: Callable[[], dict[str, int]] | None) -> None:
    """Where ``mmcds_queue_depth`` reads waiting jobs per queue (the running app's queue)."""
    QUEUE_DEPTH.source = source


def observe_cache(hits: int, misses: int) -> None:
    if hits:
        CACHE_LOOKUPS.labels("hit").inc(hits)
    if misses:
        CACHE_LOOKUPS.labels("miss").inc(misses)


def observe_findings(outcomes: Iterable[tuple[str, str]]) -> None:
    """(finding, outcome) pairs of one card."""
    for finding, outcome in outcomes:
        FINDING_OUTCOMES.labels(finding, outcome).inc()


def observe_feedback(outcome: str) -> None:
    if outcome not in ("accepted", "overridden"):
        raise ValueError(f"feedback outcome must be accepted or overridden, not {outcome!r}")
    CARD_FEEDBACK.labels(outcome).inc()
