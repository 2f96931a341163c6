"""Shared fixtures: the real test servers (started once per session), PostgreSQL, shared data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from mmcds.dev.servers import FhirSandbox, OrthancPacs, ServerUnavailable

# MMCDS_TEST_POSTGRES_URL lets parallel checkouts on one machine use databases of their own.
POSTGRES_URL = os.environ.get(
    "MMCDS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _unavailable(reason: str) -> NoReturn:
    """Skip on a developer machine without the tool; fail in CI, where set-up installs it, so
    a broken install can never turn the integration tests into silent skips."""
    if os.environ.get("CI"):
        pytest.fail(f"required test server unavailable in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def fhir_sandbox() -> Iterator[FhirSandbox]:
    try:
        sandbox = FhirSandbox().start()
    except ServerUnavailable as err:  # a missing tool skips; a server that fails to start fails
        _unavailable(str(err))
    with sandbox:
        yield sandbox


@pytest.fixture(scope="session")
def orthanc() -> Iterator[OrthancPacs]:
    try:
        pacs = OrthancPacs().start()
    except ServerUnavailable as err:
        _unavailable(str(err))
    with pacs:
        yield pacs


@pytest.fixture
def fhir_url(fhir_sandbox: FhirSandbox) -> str:
    """Base URL of an empty FHIR R4 sandbox."""
    fhir_sandbox.reset()
    return fhir_sandbox.base_url


@pytest.fixture
def dicomweb(orthanc: OrthancPacs) -> OrthancPacs:
    """An empty Orthanc: use `.dicomweb_url` and `.auth` (and `.base_url` for its REST API)."""
    orthanc.reset()
    return orthanc


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of the local PostgreSQL test database; where none answers at
    127.0.0.1:5432, a throw-away server started with Debian's initdb/pg_ctl."""
    import psycopg

    from mmcds.dev.postgres import ThrowawayPostgres

    try:
        psycopg.connect(POSTGRES_URL.replace("+psycopg", ""), connect_timeout=3).close()
    except psycopg.OperationalError:
        try:
            server = ThrowawayPostgres().start()
        except ServerUnavailable as err:
            _unavailable(f"PostgreSQL not reachable at {POSTGRES_URL} and {err}")
        with server:
            yield server.url
        return
    yield POSTGRES_URL


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only reference data in ../shared/data (absent in a fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data {SHARED_DATA} is absent (it sits beside the repo checkout)")
    return SHARED_DATA
