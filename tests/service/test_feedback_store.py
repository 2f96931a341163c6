"""The feedback store against SQLite (a temp file) and the real PostgreSQL test database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from mmcds.service.feedback import Feedback, FeedbackStore, OverrideReason


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FeedbackStore]:
    url = (
        f"sqlite:///{tmp_path / 'feedback.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    s = FeedbackStore(url)
    yield s
    s.close()


def _service() -> str:
    """A service id of this test alone: the PostgreSQL database is shared between runs."""
    return f"svc-{uuid.uuid4().hex[:10]}"


def test_same_card_outcome_and_timestamp_is_one_record(store: FeedbackStore) -> None:
    service, card = _service(), str(uuid.uuid4())
    when = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC)
    fb = Feedback(
        service_id=service,
        card_uuid=card,
        outcome="overridden",
        outcome_timestamp=when,
        override_reason=OverrideReason("disagree", "urn:mmcds:override-reason", "Disagree"),
        user_comment="clear lungs on my read",
    )
    assert store.record(fb) is True
    assert store.record(fb) is False  # the EHR retried
    # the same instant written in another zone is the same timestamp
    same = Feedback(service, card, "overridden", when.astimezone(timezone(timedelta(hours=2))))
    assert store.record(same) is False
    later = Feedback(service, card, "overridden", when + timedelta(seconds=1))
    assert store.record(later) is True
    stored = store.list(service_id=service)
    assert len(stored) == 2
    assert stored[1] == fb  # oldest last; every field read back as written
    assert stored[0].outcome_timestamp == when + timedelta(seconds=1)


def test_feedback_is_linked_to_the_analysis_of_its_card(store: FeedbackStore) -> None:
    service, card, suggestion = _service(), str(uuid.uuid4()), str(uuid.uuid4())
    analysis = uuid.uuid4().hex
    store.link_card(card, analysis, service_id=service)
    store.link_card(card, "another", service_id=service)  # first link wins
    assert store.analysis_of(card) == analysis
    assert store.analysis_of(str(uuid.uuid4())) is None
    when = datetime.now(UTC)
    assert store.record(
        Feedback(service, card, "accepted", when, accepted_suggestions=(suggestion,))
    )
    [fb] = store.list(analysis_id=analysis)
    assert fb.analysis_id == analysis
    assert fb.accepted_suggestions == (suggestion,)
    assert fb.source == "cds-hooks"


def test_list_filters_and_limits(store: FeedbackStore) -> None:
    service, other = _service(), _service()
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(5):
        store.record(
            Feedback(
                service,
                str(uuid.uuid4()),
                "accepted",
                base + timedelta(hours=i),
                source="review-page",
            )
        )
    store.record(Feedback(other, str(uuid.uuid4()), "accepted", base))
    assert len(store.list(service_id=service)) == 5
    assert len(store.list(service_id=service, limit=2)) == 2
    recent = store.list(service_id=service, since=base + timedelta(hours=3))
    assert [f.outcome_timestamp.hour for f in recent] == [4, 3]
    assert all(f.source == "review-page" for f in recent)
    # naive timestamps are taken as UTC
    assert len(store.list(service_id=service, since=datetime(2026, 1, 1, 4))) == 1


def test_an_unknown_outcome_is_refused(store: FeedbackStore) -> None:
    with pytest.raises(ValueError, match="outcome"):
        store.record(Feedback(_service(), "c", "maybe", datetime.now(UTC)))  # type: ignore[arg-type]
