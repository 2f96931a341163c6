"""Analyses and their explanations, stored once and read by the hook and the review page.

Keyed by ``Analysis.identifier`` (a hash of patient, model versions and input hashes), so the
same analysis is stored once whoever computes it first. Two tables in the service's database
(SQLite or PostgreSQL, ``mmcds.db``): one row per analysis with the assessment and the
explanation as JSON, and one row per binary -- heatmaps as ``.npy`` bytes (read back with
``allow_pickle=False``, so reading cannot run code) and overlays as PNG.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from sqlalchemy import (
    Column,
    DateTime,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from mmcds.db import DriverQuery, create_tables, make_engine
from mmcds.records import (
    Analysis,
    EvidenceSpan,
    Explanation,
    ImageSaliency,
    LabContribution,
    ModalityShapley,
    PatientRecord,
)
from mmcds.service.conformance import problems_cards_response

log = logging.getLogger(__name__)
FORMAT = "mmcds-explanation-v1"
# Blob names of the inputs kept for the review page (``record_blobs``).
PIXELS, NOTE, INPUTS = "pixels", "note", "inputs"
ASSESSMENT_CACHE = 20_000


@dataclass
class StoredAnalysis:
    identifier: str
    patient_id: str
    assessment: dict[str, Any]  # findings with probability, thresholds, level; model versions
    explanation: Explanation
    created_at: datetime | None


@dataclass
class StoredSummary:
    identifier: str
    patient_id: str
    assessment: dict[str, Any]
    created_at: datetime | None


def _tables(metadata: MetaData) -> tuple[Table, Table]:
    analyses = Table(
        "mmcds_analyses",
        metadata,
        Column("identifier", String(64), primary_key=True),
        Column("patient_id", String(256), nullable=False, index=True),
        Column("model_version", String(256), nullable=False),
        Column("assessment", Text, nullable=False),
        Column("explanation", Text, nullable=False),
        Column("created_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
    )
    blobs = Table(
        "mmcds_analysis_blobs",
        metadata,
        Column("identifier", String(64), primary_key=True),
        Column("name", String(512), primary_key=True),
        Column("media_type", String(64), nullable=False),
        Column("data", LargeBinary, nullable=False),
    )
    return analyses, blobs


def _answers_table(metadata: MetaData) -> Table:
    """The answer a hook gives for a patient on a FHIR server: the cards of its latest analysis
    and the fingerprint of the inputs it read (``mmcds.service.fast_path``)."""
    return Table(
        "mmcds_answers",
        metadata,
        Column("key", String(64), primary_key=True),  # hash of fhir server + patient id
        Column("fhir_server", String(1024), nullable=False),
        Column("patient_id", String(256), nullable=False),
        Column("analysis_id", String(64), nullable=False),
        Column("fingerprint", String(64), nullable=False),
        Column("cards", Text, nullable=False),
        Column("updated_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
    )


@dataclass(frozen=True)
class StoredAnswer:
    fhir_server: str
    patient_id: str
    analysis_id: str
    fingerprint: str  # of the patient's inputs on the FHIR server when the analysis read them
    cards: list[dict[str, Any]]


STALE = "stale"  # a fingerprint no input set has: the answer is known to be out of date


class NonConformantAnswer(ValueError):
    """Cards that break the CDS Hooks 2.0 response rules (``mmcds.service.conformance``)."""


def answer_key(fhir_server: str, patient_id: str) -> str:
    return hashlib.sha256(f"{fhir_server.rstrip('/')}|{patient_id}".encode()).hexdigest()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _clean(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def assessment_dict(analysis: Analysis) -> dict[str, Any]:
    a = analysis.assessment
    return {
        "model_id": a.model_id,
        "model_version": a.model_version,
        "trained": a.trained,
        "calibration": a.calibration,
        "modalities_used": list(a.modalities_used),
        "subset": a.subset,
        "out_of_distribution": dict(a.out_of_distribution),
        # for the worklist's site filter (no PHI: the site names of the images' scanners)
        # what the model could not use, in words (``Missing.reason``; never the reference)
        "missing": [{"modality": m.modality, "reason": m.reason} for m in analysis.record.missing],
        "unused_modalities": list(a.unused_modalities),
        "sites": sorted({im.site for im in analysis.record.images if im.site}),
        "findings": [
            {
                "finding": f.finding,
                "probability": f.probability,
                "warning_threshold": f.warning_threshold,
                "critical_threshold": f.critical_threshold,
                "level": str(f.level),
                "status": f.status,
                "reason": f.reason,
            }
            for f in a.findings
        ],
    }


def _blob_name(s: ImageSaliency, kind: str) -> str:
    return f"{kind}/{s.sop_uid}/{s.finding}/{s.method}"


def explanation_json(explanation: Explanation) -> dict[str, Any]:
    """JSON-safe form; heatmaps and overlays are referenced by blob name, stored apart."""
    return {
        "format": FORMAT,
        "analysis_id": explanation.analysis_id,
        "images": [
            {
                "sop_uid": s.sop_uid,
                "finding": s.finding,
                "method": s.method,
                "boxes": [list(b) for b in s.boxes],
                "image_shape": list(s.original_shape),
                "heatmap": _blob_name(s, "heatmap"),
                "overlay": _blob_name(s, "overlay") if s.overlay_png else None,
            }
            for s in explanation.images
        ],
        "evidence": [asdict(e) for e in explanation.evidence],
        "labs": [
            {
                **asdict(c),
                "time": _iso(c.time),
                "ref_low": _clean(c.ref_low),
                "ref_high": _clean(c.ref_high),
            }
            for c in explanation.labs
        ],
        "modalities": [asdict(m) for m in explanation.modalities],
        "summary_line": explanation.summary_line,
        "summary_markdown": explanation.summary_markdown,
        "summary_html": explanation.summary_html,
        "seconds": explanation.seconds,
    }


def _evidence(data: dict[str, Any]) -> EvidenceSpan:
    """An evidence span as stored; one stored before spans had a direction takes its score's
    sign (its assertion was never computed, so it stays the default)."""
    if "direction" not in data:
        data = {**data, "direction": "supports" if data["score"] >= 0 else "argues_against"}
    return EvidenceSpan(**data)


def explanation_from_json(data: dict[str, Any], blobs: dict[str, bytes]) -> Explanation:
    if data.get("format") != FORMAT:
        raise ValueError(f"stored explanation has format {data.get('format')!r}, expected {FORMAT}")
    images = []
    for s in data["images"]:
        heat = np.load(io.BytesIO(blobs[s["heatmap"]]), allow_pickle=False)
        boxes = [(int(b[0]), int(b[1]), int(b[2]), int(b[3]), float(b[4])) for b in s["boxes"]]
        overlay = blobs.get(s["overlay"]) if s["overlay"] else None
        # stored before heatmaps moved to the review grid: they are on the original grid
        shape = tuple(s.get("image_shape") or heat.shape)
        images.append(
            ImageSaliency(
                s["sop_uid"], s["finding"], s["method"], heat, boxes, overlay, (shape[0], shape[1])
            )
        )
    labs = [
        LabContribution(**{**c, "time": datetime.fromisoformat(c["time"]) if c["time"] else None})
        for c in data["labs"]
    ]
    return Explanation(
        analysis_id=data["analysis_id"],
        images=images,
        evidence=[_evidence(e) for e in data["evidence"]],
        labs=labs,
        modalities=[ModalityShapley(**m) for m in data["modalities"]],
        summary_line=data["summary_line"],
        summary_markdown=data["summary_markdown"],
        summary_html=data["summary_html"],
        seconds=dict(data["seconds"]),
    )


def explanation_blobs(explanation: Explanation) -> list[tuple[str, str, bytes]]:
    blobs = []
    for s in explanation.images:
        heat = _npy(s.heatmap.astype(np.float32))
        blobs.append((_blob_name(s, "heatmap"), "application/x-npy", heat))
        if s.overlay_png:
            blobs.append((_blob_name(s, "overlay"), "image/png", s.overlay_png))
    return blobs


def _pixels_png(pixels: np.ndarray) -> bytes:
    """[0, 1] float pixels as a lossless 16-bit grey PNG: the review page windows it."""
    # in place on one float32 copy: five temporaries of a full-size image cost ~0.2 s
    scaled = np.nan_to_num(np.asarray(pixels, dtype=np.float32), copy=True)
    np.clip(scaled, 0, 1, out=scaled)
    scaled *= 65535
    grey = np.rint(scaled, out=scaled).astype(np.uint16)
    buf = io.BytesIO()
    # zlib level 1: a 3,000 x 2,500 radiograph took 3 s at the default 6 (per image, on the
    # analysis's path); lossless either way
    Image.fromarray(grey).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def record_blobs(record: PatientRecord) -> list[tuple[str, str, bytes]]:
    """What the model saw, kept with the analysis for the review page: the decoded images,
    the notes' text and the labs' values over the window. A snapshot, not a live read: a
    clinician reviews the inputs as they were analysed, and reading back needs no EHR token."""
    blobs = [
        (f"{PIXELS}/{i}", "image/png", _pixels_png(im.pixels)) for i, im in enumerate(record.images)
    ]
    images = [
        {"sop_uid": im.sop_uid, "view": im.view, "site": im.site, "acquired": _iso(im.acquired)}
        for im in record.images
    ]
    notes = [
        {"reference": n.reference, "note_type": n.note_type, "date": _iso(n.date)}
        for n in record.notes
    ]
    blobs += [
        (f"{NOTE}/{i}", "text/plain", n.text.encode("utf-8")) for i, n in enumerate(record.notes)
    ]
    labs: dict[str, list[list[Any]]] = {}
    frame = record.labs.dropna(subset=["name", "value", "time"])
    for name, value, when in zip(frame["name"], frame["value"], frame["time"], strict=True):
        number = _clean(_number(value))
        if number is not None:
            labs.setdefault(str(name), []).append([pd.Timestamp(when).isoformat(), number])
    index = {"images": images, "notes": notes, "labs": {k: sorted(v) for k, v in labs.items()}}
    blobs.append((INPUTS, "application/json", json.dumps(index).encode("utf-8")))
    return blobs


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class AnalysisStore:
    """``put`` an analysis with its explanation, ``get`` it back by identifier."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url, purpose="analysis store")
        self.dialect = self.engine.dialect.name
        self.analyses, self.blobs = _tables(MetaData())
        create_tables(self.engine, self.analyses, self.blobs, purpose="analysis store")
        self.answers = _answers_table(MetaData())
        create_tables(self.engine, self.answers, purpose="analysis store")
        # The two reads on a hook's path, built once: building a statement cost more than
        # running it (60 of 100 us per read, SQLite).
        by_key = self.answers.c.key == bindparam("key")
        self._answer_q = select(self.answers).where(by_key)
        version = select(self.answers.c.analysis_id, self.answers.c.fingerprint).where(by_key)
        self._version_q = DriverQuery(self.engine, version)
        # Parsed assessments by identifier for ``recent``: a stored row never changes (the first
        # write wins), so the cache cannot go stale; bounded by dropping it whole when full.
        self._assessments: dict[str, dict[str, Any]] = {}

    def close(self) -> None:
        self.engine.dispose()

    def _insert(self, table: Table, keys: list[str]) -> Any:
        if self.dialect == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing(index_elements=keys)
        if self.dialect == "sqlite":
            return sqlite.insert(table).on_conflict_do_nothing(index_elements=keys)
        return table.insert()

    def put(self, analysis: Analysis, explanation: Explanation) -> bool:
        """Store both; False when this identifier was stored already (the first write wins:
        an identifier fixes the inputs and model versions, so the explanation is the same)."""
        if explanation.analysis_id != analysis.identifier:
            raise ValueError("the explanation belongs to another analysis")
        blobs = explanation_blobs(explanation) + record_blobs(analysis.record)
        row = {
            "identifier": analysis.identifier,
            "patient_id": analysis.record.patient.id,
            "model_version": analysis.assessment.model_version,
            "assessment": json.dumps(assessment_dict(analysis)),
            "explanation": json.dumps(explanation_json(explanation)),
        }
        with self.engine.begin() as conn:  # one transaction: never an analysis without its maps
            # RETURNING says whether this writer inserted (rowcount is not portable here)
            stmt = self._insert(self.analyses, ["identifier"]).returning(self.analyses.c.identifier)
            if conn.execute(stmt, row).first() is None:
                return False
            if blobs:
                conn.execute(
                    self._insert(self.blobs, ["identifier", "name"]),
                    [
                        {"identifier": analysis.identifier, "name": n, "media_type": t, "data": d}
                        for n, t, d in blobs
                    ],
                )
        return True

    def get(self, identifier: str) -> StoredAnalysis | None:
        a, b = self.analyses, self.blobs
        with self.engine.connect() as conn:
            row = conn.execute(select(a).where(a.c.identifier == identifier)).first()
            if row is None:
                return None
            blobs = {
                r.name: bytes(r.data)
                for r in conn.execute(
                    select(b.c.name, b.c.data).where(b.c.identifier == identifier)
                )
            }
        return StoredAnalysis(
            identifier=row.identifier,
            patient_id=row.patient_id,
            assessment=json.loads(row.assessment),
            explanation=explanation_from_json(json.loads(row.explanation), blobs),
            created_at=row.created_at,
        )

    def blob(self, identifier: str, name: str) -> bytes | None:
        """One stored binary by name (``PIXELS``/i, ``NOTE``/i, ``INPUTS``, heatmaps)."""
        b = self.blobs
        with self.engine.connect() as conn:
            data = conn.execute(
                select(b.c.data).where(b.c.identifier == identifier, b.c.name == name)
            ).scalar_one_or_none()
        return bytes(data) if data is not None else None

    def recent(self, *, since: datetime | None = None, limit: int = 500) -> list[StoredSummary]:
        """The newest analyses first, without their explanations (the worklist)."""
        a = self.analyses
        query = select(a.c.identifier, a.c.patient_id, a.c.assessment, a.c.created_at)
        if since is not None:
            query = query.where(a.c.created_at >= since)
        query = query.order_by(a.c.created_at.desc()).limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        if len(self._assessments) > ASSESSMENT_CACHE:
            self._assessments.clear()
        cache = self._assessments
        return [
            StoredSummary(
                r.identifier,
                r.patient_id,
                cache.get(r.identifier) or cache.setdefault(r.identifier, json.loads(r.assessment)),
                r.created_at,
            )
            for r in rows
        ]

    def overlay(self, identifier: str, sop_uid: str, finding: str, method: str) -> bytes | None:
        """One overlay PNG, without loading the rest (the review page's image route)."""
        b = self.blobs
        name = f"overlay/{sop_uid}/{finding}/{method}"
        with self.engine.connect() as conn:
            data = conn.execute(
                select(b.c.data).where(b.c.identifier == identifier, b.c.name == name)
            ).scalar_one_or_none()
        return bytes(data) if data is not None else None

    # --- answers: what a hook says for a patient, while its inputs stay as they were ----------

    def put_answer(self, answer: StoredAnswer) -> None:
        """Store (or replace) the patient's answer: the latest analysis wins. Cards that break
        the CDS Hooks 2.0 rules are refused (``NonConformantAnswer``): checked here once, so a
        hook serving them need not check them again."""
        problems = problems_cards_response({"cards": answer.cards})
        if problems:
            raise NonConformantAnswer(f"answer of analysis {answer.analysis_id}: {problems[:3]}")
        row = {
            "key": answer_key(answer.fhir_server, answer.patient_id),
            "fhir_server": answer.fhir_server.rstrip("/"),
            "patient_id": answer.patient_id,
            "analysis_id": answer.analysis_id,
            "fingerprint": answer.fingerprint,
            "cards": json.dumps(answer.cards),
        }
        changed = {k: row[k] for k in ("analysis_id", "fingerprint", "cards")}
        t = self.answers
        if self.dialect == "postgresql":
            pg = postgresql.insert(t).values(row)
            stmt: Any = pg.on_conflict_do_update(
                index_elements=["key"], set_={**changed, "updated_at": func.now()}
            )
        elif self.dialect == "sqlite":
            lite = sqlite.insert(t).values(row)
            stmt = lite.on_conflict_do_update(
                index_elements=["key"], set_={**changed, "updated_at": func.now()}
            )
        else:  # pragma: no cover - the service runs on SQLite or PostgreSQL
            raise ValueError(f"answers need SQLite or PostgreSQL, not {self.dialect}")
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def get_answer(self, fhir_server: str, patient_id: str) -> StoredAnswer | None:
        key = answer_key(fhir_server, patient_id)
        with self.engine.connect() as conn:
            row = conn.execute(self._answer_q, {"key": key}).first()
        if row is None:
            return None
        cards = json.loads(row.cards)
        problems = problems_cards_response({"cards": cards})
        if problems:  # a row not written by ``put_answer`` (or by an older version): not served
            log.error("stored answer of analysis %s not served: %s", row.analysis_id, problems[:3])
            return None
        r = row
        return StoredAnswer(r.fhir_server, r.patient_id, r.analysis_id, r.fingerprint, cards)

    def answer_version(self, fhir_server: str, patient_id: str) -> tuple[str, str] | None:
        """(analysis id, fingerprint) of the patient's stored answer: what tells a cached copy
        of its cards from a replaced or stale one, without reading and parsing the cards."""
        row = self._version_q.first(key=answer_key(fhir_server, patient_id))
        return None if row is None else (row[0], row[1])

    def mark_stale(self, fhir_server: str, patient_id: str) -> bool:
        """A notification said the patient's data changed; False when no answer is stored."""
        t = self.answers
        key = answer_key(fhir_server, patient_id)
        with self.engine.begin() as conn:
            done = conn.execute(
                t.update().where(t.c.key == key).values(fingerprint=STALE, updated_at=func.now())
            )
        return bool(done.rowcount)
