"""The typed values that flow between the pipeline's stages.

gather -> ``PatientRecord`` -> encode -> ``Encodings`` -> fuse -> ``Assessment``
-> explain -> ``Explanation`` -> report -> ``Report``.

Every stage takes and returns these plain values, so each stage can be run, tested and timed on
its own, and the CLI, the hook handler and the batch scorer call the same pipeline.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum
from typing import Literal

import numpy as np
import pandas as pd

Modality = Literal["image", "text", "labs"]
MODALITIES: tuple[Modality, ...] = ("image", "text", "labs")

#: Columns of ``PatientRecord.labs``; one row per FHIR Observation value, in canonical units.
LAB_COLUMNS = [
    "loinc",  # LOINC code, e.g. "6690-2"
    "name",  # the project's short name for the analyte, e.g. "wbc" (None if not in the catalogue)
    "display",  # the display text sent by the EHR
    "value",  # float, converted to the canonical unit
    "unit",  # canonical UCUM unit after conversion
    "source_value",  # float as sent
    "source_unit",  # UCUM unit as sent
    "time",  # pandas Timestamp (UTC) of effective[x]
    "ref_low",  # reference range in the canonical unit, NaN if absent
    "ref_high",
    "interpretation",  # e.g. "H", "L", "N" or None
    "reference",  # "Observation/<id>"
]


def content_hash(data: bytes | str) -> str:
    """SHA-256 hex digest: the identity of an input, used as the embedding-cache key."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class Patient:
    id: str
    sex: str | None = None
    birth_date: date | None = None


@dataclass
class ImageInput:
    """One decoded image with its provenance.

    ``pixels`` is float32, shape (H, W), in [0, 1], already through the Modality and VOI LUTs and
    with MONOCHROME1 inverted, so bright always means dense (bone, fluid, consolidation).
    """

    pixels: np.ndarray
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str | None = None
    view: str | None = None
    site: str | None = None
    acquired: datetime | None = None
    reference: str | None = None  # "ImagingStudy/<id>"
    content_hash: str = ""
    body_part: str | None = None  # DICOM BodyPartExamined, for the quality gate
    bits_stored: int | None = None  # DICOM BitsStored (None for PNG/JPEG): another detector


@dataclass
class Note:
    """One clinical note as plain text; evidence offsets always index into ``text``."""

    text: str
    reference: str  # "DocumentReference/<id>" or "DiagnosticReport/<id>"
    note_type: str | None = None
    date: datetime | None = None
    content_hash: str = ""

    def __post_init__(self) -> None:
        if not self.content_hash:
            self.content_hash = content_hash(self.text)


@dataclass(frozen=True)
class Missing:
    """Something the record should have had but could not load: never dropped silently."""

    modality: Modality
    reason: str
    reference: str | None = None


@dataclass
class PatientRecord:
    patient: Patient
    images: list[ImageInput] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    labs: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=LAB_COLUMNS))
    missing: list[Missing] = field(default_factory=list)
    encounter: str | None = None  # "Encounter/<id>" when the hook gave one

    def has(self, modality: Modality) -> bool:
        if modality == "image":
            return bool(self.images)
        if modality == "text":
            return bool(self.notes)
        return not self.labs.empty


@dataclass
class ModalityEncoding:
    """Tokens one encoder produced for one patient: (n_tokens, dim) float32.

    ``spans`` ties each token back to its input (an image SOP UID, a note chunk's
    ``reference#start-end``, a lab name) so explanations can point at the source.
    """

    modality: Modality
    tokens: np.ndarray
    spans: list[str]
    model_id: str
    input_hashes: list[str]
    # Text only, where the fusion model has a lexical path (``mmcds.fusion.lexical``): its
    # per-finding logits (F,) over the whole of the patient's notes, computed by the pipeline
    # of that model; None otherwise.
    lexical: np.ndarray | None = None


@dataclass
class Encodings:
    by_modality: dict[Modality, ModalityEncoding] = field(default_factory=dict)

    @property
    def present(self) -> list[Modality]:
        return [m for m in MODALITIES if m in self.by_modality]


class Level(StrEnum):
    """CDS Hooks 2.0 card indicators."""

    info = "info"
    warning = "warning"
    critical = "critical"


#: Whether a finding's probability may be acted on (DESIGN §8). Anything but ``assessed`` is
#: shown with its reason and can never raise ``warning`` or ``critical``.
FindingStatus = Literal["assessed", "not_validated", "insufficient_inputs", "abstained"]


@dataclass(frozen=True)
class FindingScore:
    finding: str
    probability: float  # calibrated
    warning_threshold: float
    critical_threshold: float
    status: FindingStatus = "assessed"
    reason: str | None = None  # why it is not assessed, in words for the clinician

    @property
    def assessed(self) -> bool:
        return self.status == "assessed"

    @property
    def level(self) -> Level:
        if not self.assessed:
            return Level.info
        if self.probability >= self.critical_threshold:
            return Level.critical
        if self.probability >= self.warning_threshold:
            return Level.warning
        return Level.info


@dataclass
class Assessment:
    findings: list[FindingScore]
    model_id: str
    model_version: str
    trained: bool  # False until a trained checkpoint is loaded: scores then mean nothing
    modalities_used: list[Modality]
    calibration: str = "none"
    subset: str = ""  # the validated subset of inputs in force, e.g. "image+labs+text"
    # Modalities whose input lay outside what the model was validated on, with the reason.
    out_of_distribution: dict[str, str] = field(default_factory=dict)
    # Modalities the patient brought that this model never learned ("imaging not used").
    unused_modalities: list[Modality] = field(default_factory=list)

    @property
    def level(self) -> Level:
        order = [Level.info, Level.warning, Level.critical]
        return max((f.level for f in self.findings), key=order.index, default=Level.info)


# --- explanations (explain stage) ------------------------------------------------------------


#: Longest side of an image's review grid, in pixels. Heatmaps and overlays of a larger image
#: live on that image scaled down to it: a 3,000 px radiograph's heatmaps on the full grid took
#: 30 MB each and most of a full-size analysis's time (boxes, resampling, storing), while the
#: model sees 224 px and a screen shows ~1,000; 1,024 px is enough to see where.
REVIEW_MAX_SIDE = 1024

#: ``(x0, y0, x1, y1, score)``: a box in pixels, ``x1``/``y1`` exclusive.
Box = tuple[int, int, int, int, float]


def review_shape(shape: tuple[int, int], max_side: int = REVIEW_MAX_SIDE) -> tuple[int, int]:
    """The review grid of an image of ``shape`` (H, W): scaled by one factor so the longest side
    is at most ``max_side``; the image's own grid when it is no larger."""
    h, w = int(shape[0]), int(shape[1])
    scale = max_side / max(h, w, 1)
    if scale >= 1:
        return h, w
    return max(1, round(h * scale)), max(1, round(w * scale))


def rescale_box(box: Box, src: tuple[int, int], dst: tuple[int, int]) -> Box:
    """``box`` on a grid of shape ``src`` (H, W) onto a grid of shape ``dst`` covering the same
    image: each edge to the nearest pixel boundary, so a round trip returns the box."""
    x0, y0, x1, y1, score = box
    fy, fx = dst[0] / src[0], dst[1] / src[1]
    return (round(x0 * fx), round(y0 * fy), round(x1 * fx), round(y1 * fy), score)


@dataclass
class ImageSaliency:
    """Where in one image one finding's score came from.

    ``heatmap`` is float32 in [0, 1] on the image's *review grid* (``review_shape`` of
    ``image_shape``): the original pixel grid for an image of at most ``REVIEW_MAX_SIDE`` px, the
    image scaled down to it otherwise (heatmap pixel ``(i, j)`` covers original pixels
    ``[i H/h, (i+1) H/h) x [j W/w, (j+1) W/w)``); 0 also where the model's preprocessing cropped
    the image away. ``boxes`` are ``(x0, y0, x1, y1, score)`` in *original* pixels, ``x1``/``y1``
    exclusive, best first. ``image_shape`` is the original (H, W) (``ImageInput.pixels``); None
    (analyses stored before it existed) means the heatmap's own shape.
    """

    sop_uid: str
    finding: str
    method: str  # "gradcam-occlusion-cnn" or "grad-rollout-vit"
    heatmap: np.ndarray
    boxes: list[Box] = field(default_factory=list)
    overlay_png: bytes | None = None
    image_shape: tuple[int, int] | None = None

    @property
    def in_report(self) -> bool:
        """Whether the report carries this map as an overlay PNG: the CNN's (any explainer
        version). Only those are composed; the review page draws every map from its heatmap."""
        return self.method.endswith("-cnn")

    @property
    def original_shape(self) -> tuple[int, int]:
        """(H, W) of the image the boxes are in."""
        if self.image_shape is not None:
            return self.image_shape
        return int(self.heatmap.shape[0]), int(self.heatmap.shape[1])

    def peak(self) -> tuple[int, int]:
        """``(y, x)`` of the heatmap's maximum in original pixels (its grid cell's centre)."""
        h, w = self.heatmap.shape
        i, j = np.unravel_index(int(np.argmax(self.heatmap)), (h, w))
        big_h, big_w = self.original_shape
        y = min(big_h - 1, max(0, round((int(i) + 0.5) * big_h / h - 0.5)))
        x = min(big_w - 1, max(0, round((int(j) + 0.5) * big_w / w - 0.5)))
        return y, x


#: Which way a piece of evidence moved a finding's score (the sign of its attribution).
Direction = Literal["supports", "argues_against"]
#: What a note sentence asserts about what it names (``mmcds.explain.assertion``).
Assertion = Literal["affirmed", "negated", "uncertain", "historical", "family"]


@dataclass(frozen=True)
class EvidenceSpan:
    """A piece of a source note: ``note.text[start:end] == text`` for the note ``note_ref``.

    ``score`` is how much the finding's logit falls when the span is removed (positive:
    the span supports the finding); ``direction`` says the same in words. ``assertion`` is what
    the sentence asserts: "No acute airspace disease." is ``negated`` whichever way it moved the
    score, and the card says both.
    """

    finding: str
    note_ref: str
    section: str | None
    start: int
    end: int
    text: str
    score: float
    direction: Direction = "supports"
    assertion: Assertion = "affirmed"


@dataclass(frozen=True)
class LabContribution:
    """One lab's exact Shapley share of the finding's calibrated probability."""

    finding: str
    lab: str
    value: float | None  # latest value in the canonical unit; None when not measured
    unit: str | None
    time: datetime | None
    ref_low: float | None
    ref_high: float | None
    contribution: float
    interpretation: str | None = None


@dataclass(frozen=True)
class ModalityShapley:
    """Exact Shapley values of the modalities for one finding, in calibrated probability.

    ``sum(values.values()) == full - base`` where ``base`` is the prediction with every
    modality masked and ``full`` the prediction with all present.
    """

    finding: str
    values: dict[str, float]
    base: float
    full: float


@dataclass
class Explanation:
    """Everything the explain stage computed for one analysis, stored with it."""

    analysis_id: str
    images: list[ImageSaliency] = field(default_factory=list)
    evidence: list[EvidenceSpan] = field(default_factory=list)
    labs: list[LabContribution] = field(default_factory=list)
    modalities: list[ModalityShapley] = field(default_factory=list)
    summary_line: str = ""  # < 140 characters, for the card's summary
    summary_markdown: str = ""  # the card's detail
    summary_html: str = ""  # the DiagnosticReport's presentedForm
    seconds: dict[str, float] = field(default_factory=dict)  # time per part, for monitoring


@dataclass
class Analysis:
    record: PatientRecord
    encodings: Encodings
    assessment: Assessment
    skipped_chunks: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def identifier(self) -> str:
        """Deterministic id of (patient, model versions, inputs): makes write-back idempotent."""
        parts = [self.record.patient.id, self.assessment.model_id, self.assessment.model_version]
        for enc in self.encodings.by_modality.values():
            parts += [enc.model_id, *enc.input_hashes]
        return content_hash("|".join(parts))[:32]
