"""Answer a hook in milliseconds: the stored answer when it is current, else "in progress".

A hook never gathers nor encodes (DESIGN §3). Analyses are computed when data arrives (``mmcds
ingest``, a FHIR Subscription notification, or a hook that found none) by queue workers, which
store the cards together with a *fingerprint* of the inputs they read. A hook then only learns
whether those inputs are still what they were: one ``_sort=-_lastUpdated&_count=1`` search per
input type (the newest resource's id and ``lastUpdated``, and the total, so an update, an
addition and a deletion all change it). Those searches are prefetch templates in discovery: an
EHR that prefetches sends their results with the hook, and no FHIR request is made; otherwise
the service sends them in one ``batch`` request. Same fingerprint: the stored cards are the
answer. Different or none: the work is queued and the
hook answers within ``MMCDS_HOOK_BUDGET_MS`` with an ``info`` card "analysis in progress" (or no
card), and the worker writes the report back when it is done.

What the fingerprint does not see: prior radiology DiagnosticReports and non-AI ``Media`` (the
service writes both kinds itself, so they would mark every answer stale after its write-back);
a change to those alone is picked up by the next ingest or notification, not by a hook.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlencode

import httpx

from mmcds.errors import UpstreamUnavailable
from mmcds.service.analysis_store import STALE, AnalysisStore, StoredAnswer

log = logging.getLogger(__name__)

State = Literal["current", "stale", "miss", "over-budget", "unavailable"]


PATIENT_ID = "{{context.patientId}}"
_NEWEST = urlencode({"_sort": "-_lastUpdated", "_count": "1", "_elements": "id"})


def currency_templates() -> dict[str, str]:
    """The searches whose newest entry fingerprints a patient's inputs, by prefetch key: the
    same filters ``mmcds.fhir.gather`` reads with (the Patient too: sex and age are inputs).
    Declared as prefetch templates in discovery, so an EHR that prefetches sends the
    fingerprint with the hook and a current answer needs no FHIR request at all."""
    labs = urlencode({"category": "laboratory,vital-signs"})
    return {
        "newestPatient": f"Patient?_id={PATIENT_ID}&{_NEWEST}",
        "newestDocumentReference": (
            f"DocumentReference?patient={PATIENT_ID}&status=current&{_NEWEST}"
        ),
        "newestObservation": f"Observation?patient={PATIENT_ID}&{labs}&{_NEWEST}",
        "newestImagingStudy": f"ImagingStudy?patient={PATIENT_ID}&{_NEWEST}",
    }


def currency_searches(patient_id: str) -> dict[str, str]:
    """``currency_templates`` for one patient, as the service sends them in a batch."""
    pid = quote(patient_id, safe="")
    return {key: t.replace(PATIENT_ID, pid) for key, t in currency_templates().items()}


def batch_request(patient_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": url}}
            for url in currency_searches(patient_id).values()
        ],
    }


class CurrencyError(UpstreamUnavailable):
    """The FHIR server did not answer the currency check usably."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def fingerprint(batch_response: dict[str, Any]) -> str:
    """The fingerprint of the service's batch of currency searches; ``CurrencyError`` when an
    entry failed (the patient unknown: status 404)."""
    keys = list(currency_templates())
    entries = batch_response.get("entry") or []
    if batch_response.get("resourceType") != "Bundle" or len(entries) != len(keys):
        raise CurrencyError("the FHIR server's batch response does not match the request")
    bundles = {}
    for key, entry in zip(keys, entries, strict=True):
        status = str((entry.get("response") or {}).get("status", ""))
        if not status.startswith("2"):
            raise CurrencyError(f"{key} currency search failed ({status or 'no status'})")
        bundles[key] = entry.get("resource")
    return fingerprint_of(bundles)


def fingerprint_of(bundles: Mapping[str, Any]) -> str:
    """A hash of (total, newest id, newest lastUpdated) per currency search, from its result
    Bundle by prefetch key, however it came (batch or prefetch)."""
    parts: dict[str, Any] = {}
    for key, template in currency_templates().items():
        bundle = bundles.get(key)
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise CurrencyError(f"{key}: no search result Bundle")
        newest = ((bundle.get("entry") or [{}])[0]).get("resource") or {}
        # Keyed by resource type, as before the searches were prefetch templates: stored
        # fingerprints stay valid.
        parts[template.split("?")[0]] = [
            bundle.get("total"),
            newest.get("id"),
            (newest.get("meta") or {}).get("lastUpdated"),
        ]
    if parts["Patient"][0] == 0:
        raise CurrencyError("patient not found", status=404)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def prefetched_fingerprint(prefetch: Mapping[str, Any] | None) -> str | None:
    """The fingerprint the hook's prefetch gives; None when it lacks a currency key (absent,
    ``null``, an OperationOutcome: the EHR did not or could not prefetch it)."""
    if not prefetch or any(key not in prefetch for key in currency_templates()):
        return None
    try:
        return fingerprint_of(prefetch)
    except CurrencyError:
        return None


def _post_check(response: httpx.Response) -> str:
    if response.status_code >= 400:
        raise CurrencyError(f"currency check: HTTP {response.status_code}", response.status_code)
    try:
        return fingerprint(response.json())
    except ValueError as exc:
        raise CurrencyError(f"currency check: not JSON ({exc})") from exc


def _headers(token: str | None) -> dict[str, str]:
    headers = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


async def fingerprint_async(
    http: httpx.AsyncClient, fhir_server: str, patient_id: str, token: str | None
) -> str:
    """The hook's currency check: one round trip."""
    try:
        response = await http.post(
            fhir_server, json=batch_request(patient_id), headers=_headers(token)
        )
    except httpx.HTTPError as exc:
        raise CurrencyError(f"currency check: {type(exc).__name__}") from exc
    return _post_check(response)


def fingerprint_sync(
    fhir_server: str, patient_id: str, token: str | None = None, timeout_s: float = 10.0
) -> str:
    """The worker's: taken *before* it gathers, so a change during the analysis shows as stale."""
    try:
        response = httpx.post(
            fhir_server, json=batch_request(patient_id), headers=_headers(token), timeout=timeout_s
        )
    except httpx.HTTPError as exc:
        raise CurrencyError(f"currency check: {type(exc).__name__}") from exc
    return _post_check(response)


class AnswerCache:
    """Stored answers read through to the database, the latest ``size`` kept in memory.

    Sound across processes: an answer is used only when its fingerprint equals the one the FHIR
    server gives now, and a worker replaces a row only with an analysis of newer inputs; so a
    cached row that another process has since replaced is simply stale, and re-read.
    """

    def __init__(self, store: AnalysisStore, size: int) -> None:
        self.store, self._size = store, size
        self._rows: OrderedDict[tuple[str, str], StoredAnswer] = OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, fhir_server: str, patient_id: str, fingerprint: str) -> StoredAnswer | None:
        """The patient's latest stored answer (from memory when it is for ``fingerprint``)."""
        key = (fhir_server, patient_id)
        with self._lock:
            row = self._rows.get(key)
            if row is not None:
                self._rows.move_to_end(key)
        if row is None or row.fingerprint != fingerprint:
            row = self.store.get_answer(fhir_server, patient_id)
            if row is None:
                return None
            self.remember(row)
        return row

    def current(self, fhir_server: str, patient_id: str) -> StoredAnswer | None:
        """The patient's stored answer as the database has it now: its version is read on every
        call (so a stale mark or a replacement by any process shows at once), its cards from
        memory while that version is unchanged."""
        version = self.store.answer_version(fhir_server, patient_id)
        if version is None:
            with self._lock:  # gone from the database: gone from memory too
                self._rows.pop((fhir_server, patient_id), None)
            return None
        row = self.peek(fhir_server, patient_id)
        if row is None or (row.analysis_id, row.fingerprint) != version:
            row = self.store.get_answer(fhir_server, patient_id)
            if row is None:
                return None
        self.remember(row)  # most recently used: busy patients stay in memory
        return row

    def peek(self, fhir_server: str, patient_id: str) -> StoredAnswer | None:
        """The answer in memory, unchecked (when there is no time left to check)."""
        with self._lock:
            return self._rows.get((fhir_server, patient_id))

    def remember(self, answer: StoredAnswer) -> None:
        key = (answer.fhir_server, answer.patient_id)
        with self._lock:
            self._rows[key] = answer
            self._rows.move_to_end(key)
            while len(self._rows) > self._size:
                self._rows.popitem(last=False)


@dataclass(frozen=True)
class FastAnswer:
    state: State
    cards: list[dict[str, Any]]
    queued: bool = False
    reason: str | None = None  # why the data could not be checked (``unavailable``)
    unverified: StoredAnswer | None = None  # over budget: the last answer, currency unknown
    analysis_id: str | None = None  # the stored analysis the cards show


Enqueue = Callable[[str, str], Awaitable[bool]]  # (fhir server, patient id) -> newly queued


class FastPath:
    """One hook's answer: currency check, stored cards, or queue + in-progress card."""

    def __init__(
        self,
        cache: AnswerCache,
        enqueue: Enqueue | None,
        *,
        budget_ms: int,
        in_progress: Callable[[State, bool], list[dict[str, Any]]],
        timeout_s: float,
        trust_notifications: bool = False,
        local_reads: bool = True,
    ) -> None:
        self.cache, self.enqueue = cache, enqueue
        self.budget_s = budget_ms / 1000
        self.in_progress = in_progress
        self._http: httpx.AsyncClient | None = None
        self._timeout_s = timeout_s
        self._background: set[asyncio.Task[Any]] = set()
        self.trust_notifications = trust_notifications
        self.local_reads = local_reads

    def http(self) -> httpx.AsyncClient:
        # Made on first use, inside the server's event loop; kept alive: a pooled connection
        # saves the TCP handshake on every hook.
        if self._http is None:
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            self._http = httpx.AsyncClient(timeout=self._timeout_s, limits=limits)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def answer(
        self,
        fhir_server: str,
        patient_id: str,
        token: str | None,
        prefetch: Mapping[str, Any] | None = None,
    ) -> FastAnswer:
        """The stored answer if it is current, else "in progress" (the work queued), within the
        budget. The database alone knows it is current when notifications keep the stored
        row's mark (``MMCDS_CURRENCY_CHECK=notifications``: ``/fhir-notify`` marks it stale) or
        when the hook's prefetch carries the fingerprint it was computed from; otherwise one
        FHIR batch request tells."""
        read = self._read_notified if self.trust_notifications else self._read_prefetched
        if self.local_reads:
            # SQLite in WAL mode: reading a local file never waits for a lock, so the read runs
            # on the event loop, and a current answer returns without the task and timer the
            # budget needs (a tenth of a warm hook's CPU).
            stored = read(fhir_server, patient_id, prefetch)
            if stored is not None:
                return FastAnswer("current", stored.cards, analysis_id=stored.analysis_id)
            work = self._not_known_current(fhir_server, patient_id, token)
        else:
            work = self._answer_in_thread(read, fhir_server, patient_id, token, prefetch)
        return await self._within_budget(work, fhir_server, patient_id)

    def _read_notified(
        self, fhir_server: str, patient_id: str, _: Mapping[str, Any] | None
    ) -> StoredAnswer | None:
        """The stored answer unless a notification marked it stale; read on every hook so that
        every process sees a mark at once."""
        stored = self.cache.current(fhir_server, patient_id)
        return stored if stored is not None and stored.fingerprint != STALE else None

    def _read_prefetched(
        self, fhir_server: str, patient_id: str, prefetch: Mapping[str, Any] | None
    ) -> StoredAnswer | None:
        """The stored answer if the hook's prefetch shows the inputs it was computed from."""
        known = prefetched_fingerprint(prefetch)
        if known is None:
            return None
        stored = self.cache.lookup(fhir_server, patient_id, known)
        return stored if stored is not None and stored.fingerprint == known else None

    async def _answer_in_thread(
        self,
        read: Callable[[str, str, Mapping[str, Any] | None], StoredAnswer | None],
        fhir_server: str,
        patient_id: str,
        token: str | None,
        prefetch: Mapping[str, Any] | None,
    ) -> FastAnswer:
        # A database server can be slow or gone: the read runs in a thread under the budget,
        # so neither this hook nor the others on the event loop wait for it.
        stored = await asyncio.to_thread(read, fhir_server, patient_id, prefetch)
        if stored is not None:
            return FastAnswer("current", stored.cards, analysis_id=stored.analysis_id)
        return await self._not_known_current(fhir_server, patient_id, token)

    async def _not_known_current(
        self, fhir_server: str, patient_id: str, token: str | None
    ) -> FastAnswer:
        if not self.trust_notifications:
            return await self._answer_checked(fhir_server, patient_id, token)
        # The read just made keeps a stale row in memory: a row there means "stale".
        state: State = "miss" if self.cache.peek(fhir_server, patient_id) is None else "stale"
        return await self._defer(fhir_server, patient_id, state)

    async def _within_budget(
        self, answer: Coroutine[Any, Any, FastAnswer], fhir_server: str, patient_id: str
    ) -> FastAnswer:
        work = asyncio.ensure_future(answer)
        done, _ = await asyncio.wait({work}, timeout=self.budget_s)
        if work in done:
            return work.result()
        # Over budget (a slow FHIR server or database): answer now, let the check (and the
        # enqueue it leads to) finish in the background.
        self._background.add(work)
        work.add_done_callback(self._finished)
        stored = self.cache.peek(fhir_server, patient_id)
        if stored is not None:
            return FastAnswer(
                "over-budget", stored.cards, unverified=stored, analysis_id=stored.analysis_id
            )
        return FastAnswer("over-budget", self.in_progress("over-budget", False))

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background currency check failed: %s", task.exception())

    async def _answer_checked(
        self, fhir_server: str, patient_id: str, token: str | None
    ) -> FastAnswer:
        """MMCDS_CURRENCY_CHECK=fhir: the stored answer if the FHIR server's fingerprint of the
        patient's inputs is still the one it was computed from."""
        try:
            current = await fingerprint_async(self.http(), fhir_server, patient_id, token)
        except CurrencyError as exc:
            reason = "patient not found" if exc.status == 404 else "the FHIR server is unavailable"
            if exc.status in (401, 403):
                reason = f"FHIR access refused ({exc.status})"
            return FastAnswer("unavailable", [], reason=reason)
        if self.local_reads:  # a memory hit, or a local file read: on the loop
            stored = self.cache.lookup(fhir_server, patient_id, current)
        else:
            stored = await asyncio.to_thread(self.cache.lookup, fhir_server, patient_id, current)
        if stored is not None and stored.fingerprint == current:
            return FastAnswer("current", stored.cards, analysis_id=stored.analysis_id)
        return await self._defer(fhir_server, patient_id, "miss" if stored is None else "stale")

    async def _defer(self, fhir_server: str, patient_id: str, state: State) -> FastAnswer:
        """No current answer: queue the work, answer "in progress"."""
        queued = await self.enqueue(fhir_server, patient_id) if self.enqueue else False
        return FastAnswer(state, self.in_progress(state, self.enqueue is not None), queued)
