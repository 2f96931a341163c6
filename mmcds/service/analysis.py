"""The analysis service: one trigger in, one ``AnalysisResult`` out.

This is the only place the five stages are assembled (DESIGN §1): gather (FHIR + DICOMweb ->
``PatientRecord``) -> encode and fuse (``Pipeline``) -> explain -> report (CDS card, FHIR
bundle, outbox). The hook handler, ``mmcds analyse``, batch scoring and the demo all call
``AnalysisService.analyse``; none of them wires stages of its own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mmcds.errors import UpstreamUnavailable
from mmcds.fhir.client import FhirClient, FhirError
from mmcds.fhir.dicomweb import DicomWebClient
from mmcds.fhir.gather import Limits, gather_patient
from mmcds.fhir.report import report_bundle
from mmcds.fhir.writeback import send_bundle
from mmcds.fusion.pipeline import Pipeline
from mmcds.records import Analysis, Explanation, PatientRecord, content_hash
from mmcds.service.analysis_store import AnalysisStore
from mmcds.service.cards import analysis_card, delivery_note, unavailable_card
from mmcds.service.outbox import Delivery, Outbox
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


@dataclass
class AnalysisResult:
    """Everything one analysis produced. ``unavailable`` is set (and the rest empty but the
    card) when the patient's data could not be read at all."""

    cards: list[dict[str, Any]]
    record: PatientRecord | None = None
    analysis: Analysis | None = None
    explanation: Explanation | None = None
    bundle: dict[str, Any] | None = None
    delivery: Delivery | None = None
    unavailable: str | None = None
    outbox_key: str | None = field(default=None, repr=False)


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
    ) -> None:
        self.settings = settings
        self.analyses = analyses or AnalysisStore(settings.database_url)
        self.outbox = outbox or Outbox(settings.database_url)
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
                return self._unavailable("the FHIR server is unavailable")
            except FhirError as exc:
                reason = "patient not found" if exc.status == 404 else f"FHIR error {exc.status}"
                return self._unavailable(reason)
        analysis, explanation = self.assess(record)
        bundle = report_bundle(analysis, explanation)
        key, delivery = self.write_back(trigger, analysis, bundle)
        card = analysis_card(analysis, explanation, self.model_card_url)
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

    def send(self, fhir_server: str, bundle: dict[str, Any]) -> str | None:
        """The outbox's ``Send``: one transaction to ``fhir_server``."""
        return send_bundle(fhir_server, bundle, timeout_s=self.settings.fhir_timeout_s)

    # --- helpers ----------------------------------------------------------------------------

    def _unavailable(self, reason: str) -> AnalysisResult:
        return AnalysisResult(
            cards=[unavailable_card(reason, self.model_card_url)], unavailable=reason
        )


@contextlib.contextmanager
def _clients(settings: Settings, trigger: Trigger) -> Iterator[tuple[FhirClient, DicomWebClient]]:
    """The FHIR and DICOMweb clients of one analysis, closed together."""
    auth = (
        (settings.dicomweb_user, settings.dicomweb_password)
        if settings.dicomweb_user and settings.dicomweb_password
        else None
    )
    fhir = FhirClient(trigger.fhir_server, token=trigger.token, timeout=settings.fhir_timeout_s)
    pacs = DicomWebClient(settings.dicomweb_url, auth=auth, max_bytes=settings.max_image_bytes)
    with fhir, pacs:
        yield fhir, pacs
