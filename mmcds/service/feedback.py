"""Card feedback (CDS Hooks 2.0 §Feedback), stored durably and idempotently.

The EHR posts one outcome per card (``accepted`` with the suggestions taken, or ``overridden``
with an ``overrideReason`` and a comment); the review page records the same kind of outcome.
Two tables in the service's database (SQLite or PostgreSQL, ``mmcds.db``):

- ``mmcds_feedback``: one row per (card uuid, outcome, outcome timestamp) -- the unique key is
  what makes a resent feedback (an EHR retrying after a timeout) one record, not two;
- ``mmcds_card_links``: card uuid -> analysis id, written when the card is made, so feedback
  that names only the card's uuid (all CDS Hooks feedback does) is linked to the analysis.
"""

from __future__ import annotations

import builtins
import json
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal, cast

from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    select,
)

from mmcds.db import create_tables, insert_ignoring, make_engine
from mmcds.metrics import observe_feedback
from mmcds.service.group_commit import GroupCommit

Outcome = Literal["accepted", "overridden"]
FeedbackSource = Literal["cds-hooks", "review-page"]
OUTCOMES: tuple[Outcome, ...] = ("accepted", "overridden")
LINKS_REMEMBERED = 100_000  # card uuids (~100 bytes each) kept in memory as already linked


@dataclass(frozen=True)
class OverrideReason:
    """A coding from the card's ``overrideReasons`` (the reason a clinician gave)."""

    code: str
    system: str | None = None
    display: str | None = None


@dataclass(frozen=True)
class Feedback:
    service_id: str
    card_uuid: str
    outcome: Outcome
    outcome_timestamp: datetime
    analysis_id: str | None = None
    accepted_suggestions: tuple[str, ...] = ()
    override_reason: OverrideReason | None = None
    user_comment: str | None = None
    source: FeedbackSource = "cds-hooks"


def _utc(value: datetime) -> datetime:
    """Aware UTC; a naive timestamp is taken as UTC (CDS Hooks sends instants). Stored naive UTC
    so SQLite (no time zones) and PostgreSQL compare the same values for the unique key."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _tables(metadata: MetaData) -> tuple[Table, Table]:
    feedback = Table(
        "mmcds_feedback",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("service_id", String(256), nullable=False, index=True),
        Column("card_uuid", String(128), nullable=False),
        Column("outcome", String(16), nullable=False),
        Column("outcome_timestamp", DateTime(timezone=False), nullable=False),
        Column("analysis_id", String(64), nullable=True, index=True),
        Column("accepted_suggestions", Text, nullable=False),  # JSON list of suggestion uuids
        Column("override_code", String(256), nullable=True),
        Column("override_system", String(1024), nullable=True),
        Column("override_display", String(1024), nullable=True),
        Column("user_comment", Text, nullable=True),
        Column("source", String(32), nullable=False),
        Column("received_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
        UniqueConstraint("card_uuid", "outcome", "outcome_timestamp", name="mmcds_feedback_once"),
    )
    links = Table(
        "mmcds_card_links",
        metadata,
        Column("card_uuid", String(128), primary_key=True),
        Column("analysis_id", String(64), nullable=False, index=True),
        Column("service_id", String(256), nullable=True),
        Column("created_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
    )
    return feedback, links


def _link_rows(
    card_uuids: list[str], analysis_id: str, service_id: str | None
) -> list[dict[str, Any]]:
    return [
        {"card_uuid": u, "analysis_id": analysis_id, "service_id": service_id} for u in card_uuids
    ]


class FeedbackStore:
    """``record`` feedback once, ``list`` it back for monitoring; ``link_card`` ties a card's
    uuid to its analysis when the card is made."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url, purpose="feedback store")
        self.feedback, self.links = _tables(MetaData())
        create_tables(self.engine, self.feedback, self.links, purpose="feedback store")
        self._links_writer: GroupCommit[dict[str, Any], None] = GroupCommit(self.write_links)
        # Card uuids this process has seen committed. A stored answer's cards keep their uuids,
        # so every warm hook for a patient would re-write the same links; links are never
        # deleted and the first link of a uuid wins, so a committed one needs no second write.
        self._linked: OrderedDict[str, None] = OrderedDict()

    def close(self) -> None:
        self.engine.dispose()

    # --- card -> analysis -------------------------------------------------------------------

    def link_cards(
        self, card_uuids: builtins.list[str], analysis_id: str, *, service_id: str | None = None
    ) -> None:
        """Remember which analysis cards (and their suggestions) show, in one transaction; the
        first link of a uuid wins (uuids are random, so a second one is a retry)."""
        self.write_links(_link_rows(card_uuids, analysis_id, service_id))

    async def link_cards_async(
        self, card_uuids: builtins.list[str], analysis_id: str, *, service_id: str | None = None
    ) -> None:
        """``link_cards`` from the event loop: concurrent hooks share one transaction, and
        links this process already committed are not written again."""
        new = [u for u in card_uuids if u not in self._linked]
        await self._links_writer.submit(_link_rows(new, analysis_id, service_id))
        for card_uuid in new:
            self._linked[card_uuid] = None
        while len(self._linked) > LINKS_REMEMBERED:
            self._linked.popitem(last=False)

    def write_links(self, rows: builtins.list[dict[str, Any]]) -> builtins.list[None]:
        if rows:
            with self.engine.begin() as conn:
                conn.execute(insert_ignoring(self.engine, self.links, ["card_uuid"]), rows)
        return [None] * len(rows)

    def link_card(self, card_uuid: str, analysis_id: str, *, service_id: str | None = None) -> None:
        self.link_cards([card_uuid], analysis_id, service_id=service_id)

    def analysis_of(self, card_uuid: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(self.links.c.analysis_id).where(self.links.c.card_uuid == card_uuid)
            ).scalar_one_or_none()

    # --- feedback ---------------------------------------------------------------------------

    def record(self, feedback: Feedback) -> bool:
        """Store it; False when the same card + outcome + outcome timestamp is stored already.
        Feedback without an analysis id gets the one its card was linked to, if any."""
        if feedback.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {feedback.outcome!r}")
        if feedback.analysis_id is None:
            feedback = replace(feedback, analysis_id=self.analysis_of(feedback.card_uuid))
        reason = feedback.override_reason
        row = {
            "service_id": feedback.service_id,
            "card_uuid": feedback.card_uuid,
            "outcome": feedback.outcome,
            "outcome_timestamp": _utc(feedback.outcome_timestamp).replace(tzinfo=None),
            "analysis_id": feedback.analysis_id,
            "accepted_suggestions": json.dumps(list(feedback.accepted_suggestions)),
            "override_code": reason.code if reason else None,
            "override_system": reason.system if reason else None,
            "override_display": reason.display if reason else None,
            "user_comment": feedback.user_comment,
            "source": feedback.source,
        }
        keys = ["card_uuid", "outcome", "outcome_timestamp"]
        with self.engine.begin() as conn:
            # RETURNING says whether this writer inserted (rowcount is not portable here)
            stmt = insert_ignoring(self.engine, self.feedback, keys).returning(self.feedback.c.id)
            new = conn.execute(stmt, row).first() is not None
        # Counted here, where both the CDS Hooks endpoint and the review page store it, and only
        # once stored: a replayed feedback (an EHR retrying) is one outcome, not two.
        if new:
            observe_feedback(feedback.outcome)
        return new

    def list(
        self,
        *,
        since: datetime | None = None,
        service_id: str | None = None,
        analysis_id: str | None = None,
        limit: int = 100,
    ) -> builtins.list[Feedback]:
        """Newest first (by outcome timestamp); ``since`` is inclusive."""
        f = self.feedback
        query = select(f).order_by(f.c.outcome_timestamp.desc(), f.c.id.desc()).limit(limit)
        if since is not None:
            query = query.where(f.c.outcome_timestamp >= _utc(since).replace(tzinfo=None))
        if service_id is not None:
            query = query.where(f.c.service_id == service_id)
        if analysis_id is not None:
            query = query.where(f.c.analysis_id == analysis_id)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [_from_row(r) for r in rows]


def _from_row(row: Any) -> Feedback:
    reason = (
        OverrideReason(row.override_code, row.override_system, row.override_display)
        if row.override_code is not None
        else None
    )
    return Feedback(
        service_id=row.service_id,
        card_uuid=row.card_uuid,
        outcome=cast(Outcome, row.outcome),
        outcome_timestamp=_utc(row.outcome_timestamp),
        analysis_id=row.analysis_id,
        accepted_suggestions=tuple(json.loads(row.accepted_suggestions)),
        override_reason=reason,
        user_comment=row.user_comment,
        source=cast(FeedbackSource, row.source),
    )
