"""The analysis service: one trigger in, one ``AnalysisResult`` out.

This is the only place the five stages are assembled (DESIGN §1): gather (FHIR + DICOMweb ->
``PatientRecord``) -> encode and fuse (``Pipeline``) -> explain -> report (CDS card, FHIR
bundle, outbox). The hook handler, ``mmcds analyse``, batch scoring and the demo all call
``AnalysisService.analyse``; none of them wires stages of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from mmcds.errors import ConfigurationError, UpstreamUnavailable
from mmcds.fhir.bundle_limits import BundleLimits, BundleTooLarge
from mmcds.fhir.client import FhirClient, FhirError
from mmcds.fhir.dicomweb import DicomWebClient
from mmcds.fhir.gather import FhirReader, Limits, gather_patient
from mmcds.fhir.prefetch import PrefetchedFhir
from mmcds.fhir.report import report_bundle
from mmcds.fhir.smart_auth import DEFAULT_SCOPE, BackendCredentials, BackendServicesAuth
from mmcds.fhir.writeback import Sent, send_bundle
from mmcds.fusion.pipeline import Pipeline
from mmcds.metrics import observe_findings
from mmcds.records import Analysis, Explanation, PatientRecord, content_hash
from mmcds.service.analysis_store import STALE, AnalysisStore, StoredAnswer
from mmcds.service.cards import (
    alarms,
    analysis_card,
    delivery_note,
    in_progress_card,
    stored_alarms,
    unavailable_card,
    unverified_cards,
)
from mmcds.service.fast_path import (
    AnswerCache,
    CurrencyError,
    FastAnswer,
    FastPath,
    State,
    fingerprint_sync,
)
from mmcds.service.outbox import Delivery, Outbox
from mmcds.service.queue import WorkQueue, queue_conninfo
from mmcds.serving.backend import explain_analysis, is_remote, load_pipeline
from mmcds.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trigger:
    """What asks for an analysis: a patient on a FHIR server, and who asks."""

    patient_id: str
    fhir_server: str
    token: str | None = None  # the EHR's access token for reading; never used for write-back
    encounter: str | None = None  # "Encounter/<id>"
    request_id: str = ""  # for the log (never PHI)
    # CDS Hooks prefetch, by key (``mmcds.fhir.prefetch``): read before asking the server.
    prefetch: Mapping[str, Any] | None = field(default=None, compare=False)


@dataclass
class AnalysisResult:
    """Everything one analysis produced. ``unavailable`` is set (and the rest empty but the
    card) when the patient's data could not be read at all."""

    cards: list[dict[str, Any]]
    record: PatientRecord | None = None
    analysis: Analysis | None = None
    explanation: Explanation | None = None
    bundle: dict[str, Any] | None = None
    delivery: Delivery | None = None  # None: not written back (the card says so)
    unavailable: str | None = None
    # The Patient could be neither prefetched nor read from the FHIR server (a hook: 412).
    fhir_unreachable: bool = False
    outbox_key: str | None = field(default=None, repr=False)
    # A hook answered from a stored analysis: which one (``analysis`` itself is not loaded).
    stored_analysis_id: str | None = None

    @property
    def analysis_id(self) -> str | None:
        """The analysis the cards show, whether computed now or stored."""
        return self.analysis.identifier if self.analysis is not None else self.stored_analysis_id


class AnalysisService:
    """Runs the path for a trigger. Thread-safe; one analysis at a time on the models.

    ``pipeline`` is built from settings on first use when not given (loading models takes
    seconds; a service that never analyses never pays for it).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        pipeline: Pipeline | None = None,
        analyses: AnalysisStore | None = None,
        outbox: Outbox | None = None,
        queue: WorkQueue | None = None,
    ) -> None:
        self.settings = settings
        self.analyses = analyses or AnalysisStore(settings.database_url)
        self.outbox = outbox or Outbox(
            settings.database_url, max_attempts=settings.outbox_max_attempts
        )
        self.bundle_limits = BundleLimits(
            max_bundle_bytes=settings.writeback_max_bundle_bytes,
            max_string_bytes=settings.writeback_max_string_bytes,
            overlay_max_side=settings.writeback_overlay_max_side,
        )
        self._credentials = _credentials(settings)  # read once: a bad key fails at start-up
        self._auths: dict[str, httpx.Auth] = {}
        self._auths_lock = threading.Lock()
        self.model_card_url = f"{settings.public_base_url.rstrip('/')}/model-card"
        self.limits = Limits(
            max_notes=settings.max_notes,
            max_note_chars=settings.max_note_chars,
            max_images=settings.max_images,
            max_image_pixels=settings.max_image_pixels,
            max_labs=settings.max_labs,
        )
        self._pipeline = pipeline
        self._pipeline_lock = threading.Lock()
        # Two cores: one analysis at a time keeps the answer time predictable instead of
        # letting concurrent hooks thrash each other's torch threads.
        self._model_lock = threading.Lock()
        # The fast path (mmcds.service.fast_path): stored answers + the work queue. Without a
        # PostgreSQL for the queue, a miss still answers at once but cannot queue work.
        if queue is None and queue_conninfo(settings) is not None:
            queue = WorkQueue(settings, handler=self.run_job)
        self.queue = queue
        if queue is None and settings.hook_answer == "stored":
            log.warning(
                "no work queue (MMCDS_QUEUE_URL needs PostgreSQL): hooks answer only for patients "
                "`mmcds ingest` analysed; MMCDS_HOOK_ANSWER=inline analyses on the hook's path"
            )
        self.answers = AnswerCache(self.analyses, settings.answer_cache_size)
        self.fast = FastPath(
            self.answers,
            queue.defer_async if queue is not None else None,
            budget_ms=settings.hook_budget_ms,
            in_progress=self._in_progress_cards,
            timeout_s=settings.fhir_timeout_s,
            trust_notifications=settings.currency_check == "notifications",
            local_reads=self.analyses.dialect == "sqlite",
        )

    @property
    def pipeline(self) -> Pipeline:
        with self._pipeline_lock:  # concurrent first calls must not load the models twice
            if self._pipeline is None:
                self._pipeline = load_pipeline(self.settings)  # in-process or Ray Serve
            return self._pipeline

    @property
    def models_loaded(self) -> bool:
        return self._pipeline is not None

    # --- the path ---------------------------------------------------------------------------

    def analyse(self, trigger: Trigger) -> AnalysisResult:
        """Gather, assess, explain, answer and write back one patient."""
        with _clients(self.settings, trigger) as (fhir, pacs):
            try:
                record = gather_patient(
                    fhir, pacs, trigger.patient_id, limits=self.limits, encounter=trigger.encounter
                )
            except UpstreamUnavailable as exc:
                log.warning("analysis %s: FHIR unavailable: %s", trigger.request_id, exc)
                return self._unavailable("the FHIR server is unavailable", unreachable=True)
            except FhirError as exc:
                if exc.status in (401, 403):  # the EHR's token does not let us read the patient
                    return self._unavailable(f"FHIR access refused ({exc.status})", True)
                reason = "patient not found" if exc.status == 404 else f"FHIR error {exc.status}"
                return self._unavailable(reason)
        analysis, explanation = self.assess(record)
        # per finding, what this analysis shows: its level when assessed, else why not (counted
        # here, where hooks, workers and ingest all pass, not in one caller)
        observe_findings(
            (f.finding, f.level.value if f.assessed else f.status)
            for f in analysis.assessment.findings
        )
        card = analysis_card(analysis, explanation, self.model_card_url)
        try:
            bundle: dict[str, Any] | None = report_bundle(
                analysis, explanation, limits=self.bundle_limits
            )
        except BundleTooLarge as exc:  # not even the report without overlays fits
            log.error("analysis %s: report not written back: %s", trigger.request_id, exc)
            bundle = None
        key, delivery = self.write_back(trigger, analysis, bundle) if bundle else (None, None)
        card["detail"] += delivery_note(delivery)
        return AnalysisResult(
            cards=[card],
            record=record,
            analysis=analysis,
            explanation=explanation,
            bundle=bundle,
            delivery=delivery,
            outbox_key=key,
        )

    def assess(self, record: PatientRecord) -> tuple[Analysis, Explanation]:
        """Encode + fuse, and the explanation (computed once per analysis, then read back)."""
        pipeline = self.pipeline
        # Models served elsewhere batch concurrent calls (Ray Serve): only in-process models
        # need one analysis at a time.
        lock = contextlib.nullcontext() if is_remote(pipeline) else self._model_lock
        with lock:
            analysis = pipeline.analyse(record)
            stored = self.analyses.get(analysis.identifier)
            if stored is not None:
                return analysis, stored.explanation
            explanation = explain_analysis(pipeline, analysis)
            self.analyses.put(analysis, explanation)
            return analysis, explanation

    def write_back(
        self, trigger: Trigger, analysis: Analysis, bundle: dict[str, Any]
    ) -> tuple[str, Delivery | None]:
        """Store the bundle in the outbox *before* sending, then try once now: a server that is
        down gets it on a later retry (``OutboxWorker``)."""
        key = content_hash(f"{trigger.fhir_server}|{analysis.identifier}")
        self.outbox.enqueue(key, trigger.fhir_server, bundle)
        self.outbox.deliver(self.send, key=key)
        delivery = self.outbox.get(key)
        if delivery is not None and delivery.status == "delivered":
            log.info("analysis %s: DiagnosticReport/%s", trigger.request_id, delivery.report_id)
        return key, delivery

    def send(self, fhir_server: str, bundle: dict[str, Any]) -> Sent:
        """The outbox's ``Send``: one transaction to ``fhir_server``, with write-back's own
        credentials (one cached token per server)."""
        return send_bundle(
            fhir_server, bundle, timeout_s=self.settings.fhir_timeout_s, auth=self.auth(fhir_server)
        )

    def auth(self, fhir_server: str) -> httpx.Auth | None:
        s = self.settings
        if s.writeback_auth == "bearer":
            return _Bearer(s.writeback_token.get_secret_value() if s.writeback_token else "")
        if self._credentials is None:
            return None
        with self._auths_lock:
            if fhir_server not in self._auths:
                self._auths[fhir_server] = BackendServicesAuth(
                    fhir_server, self._credentials, timeout_s=s.fhir_timeout_s
                )
            return self._auths[fhir_server]

    # --- answer fast: hooks read stored answers, workers compute them -----------------------

    async def answer(self, trigger: Trigger) -> AnalysisResult:
        """A hook's answer without gathering or encoding: the stored cards when the patient's
        inputs are unchanged, else (queued) "analysis in progress", within the budget.

        ``MMCDS_HOOK_ANSWER=inline`` instead runs the whole analysis on the hook's path (using
        its prefetch): for a deployment without workers, and for tests of that path."""
        if self.settings.hook_answer == "inline":
            return await asyncio.to_thread(self.analyse, trigger)
        fast: FastAnswer = await self.fast.answer(
            trigger.fhir_server, trigger.patient_id, trigger.token, trigger.prefetch
        )
        log.info("hook %s: %s%s", trigger.request_id, fast.state, " (queued)" * fast.queued)
        if fast.state == "unavailable":
            result = self._unavailable(fast.reason or "the FHIR server is unavailable")
            # CDS Hooks: required data neither prefetched nor readable is a 412, not a card.
            result.fhir_unreachable = not _prefetched_patient(trigger)
            return result
        if fast.unverified is not None:  # said so on the card: it may predate new data
            return AnalysisResult(
                cards=unverified_cards(fast.cards), stored_analysis_id=fast.analysis_id
            )
        return AnalysisResult(cards=fast.cards, stored_analysis_id=fast.analysis_id)

    def alarms(self, result: AnalysisResult) -> list[str]:
        """The findings that alarm in ``result`` (read from the store for a stored answer)."""
        if result.analysis is not None:
            return alarms(result.analysis)
        stored = self.analyses.get(result.stored_analysis_id) if result.stored_analysis_id else None
        return stored_alarms(stored.assessment) if stored is not None else []

    def ingest(self, fhir_server: str, patient_ids: list[str], *, now: bool = False) -> list[str]:
        """Queue (or, ``now``, run here) the analysis of each patient; one state word each."""
        states = []
        for patient_id in patient_ids:
            if now or self.queue is None:
                try:
                    result = self.run_job(fhir_server, patient_id)
                except CurrencyError as exc:
                    states.append(str(exc))
                    continue
                states.append(result.unavailable or "analysed")
            else:
                states.append("queued" if self.queue.defer(fhir_server, patient_id) else "waiting")
        return states

    def run_job(self, fhir_server: str, patient_id: str) -> AnalysisResult:
        """A queue job: analyse the patient, write the report back, store the answer.

        The fingerprint is taken *before* gathering: data that changes while the analysis runs
        leaves the stored answer stale, so the next hook queues another run."""
        current = fingerprint_sync(fhir_server, patient_id, timeout_s=self.settings.fhir_timeout_s)
        result = self.analyse(Trigger(patient_id=patient_id, fhir_server=fhir_server))
        after = fingerprint_sync(fhir_server, patient_id, timeout_s=self.settings.fhir_timeout_s)
        if after != current:  # data arrived while it ran: stored, but stale from the start
            current = STALE
        if result.analysis is not None:
            answer = StoredAnswer(
                fhir_server, patient_id, result.analysis.identifier, current, result.cards
            )
            self.analyses.put_answer(answer)
            self.answers.remember(answer)
        return result

    def _in_progress_cards(self, state: State, queued: bool) -> list[dict[str, Any]]:
        if self.settings.hook_miss == "no-card":
            return []
        return [in_progress_card(state, queued, self.model_card_url)]

    # --- helpers ----------------------------------------------------------------------------

    def _unavailable(self, reason: str, unreachable: bool = False) -> AnalysisResult:
        return AnalysisResult(
            cards=[unavailable_card(reason, self.model_card_url)],
            unavailable=reason,
            fhir_unreachable=unreachable,
        )


class _Bearer(httpx.Auth):
    """A fixed bearer token (``MMCDS_WRITEBACK_AUTH=bearer``, for sandboxes)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


def _credentials(settings: Settings) -> BackendCredentials | None:
    if settings.writeback_auth != "smart-backend":
        return None
    if not settings.writeback_client_id or settings.writeback_private_key is None:
        raise ConfigurationError(
            "MMCDS_WRITEBACK_AUTH=smart-backend needs MMCDS_WRITEBACK_CLIENT_ID and "
            "MMCDS_WRITEBACK_PRIVATE_KEY"
        )
    return BackendCredentials.from_file(
        settings.writeback_client_id,
        settings.writeback_private_key,
        kid=settings.writeback_key_id,
        scope=settings.writeback_scope or DEFAULT_SCOPE,
        token_url=settings.writeback_token_url or None,
    )


def _prefetched_patient(trigger: Trigger) -> bool:
    patient = (trigger.prefetch or {}).get("patient")
    return isinstance(patient, dict) and patient.get("resourceType") == "Patient"


@contextlib.contextmanager
def _clients(settings: Settings, trigger: Trigger) -> Iterator[tuple[FhirReader, DicomWebClient]]:
    """The FHIR (prefetch first, when the hook sent one) and DICOMweb clients of one analysis,
    closed together."""
    auth = (
        (settings.dicomweb_user, settings.dicomweb_password)
        if settings.dicomweb_user and settings.dicomweb_password
        else None
    )
    fhir = FhirClient(trigger.fhir_server, token=trigger.token, timeout=settings.fhir_timeout_s)
    pacs = DicomWebClient(settings.dicomweb_url, auth=auth, max_bytes=settings.max_image_bytes)
    with fhir, pacs:
        if trigger.prefetch is None:
            yield fhir, pacs
        else:
            yield PrefetchedFhir(trigger.prefetch, trigger.patient_id, fhir), pacs
