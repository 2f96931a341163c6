"""SMART Backend Services for write-back, against a real OAuth 2 token endpoint (authlib) and a
FHIR sandbox that requires its tokens (checked against the token server's JWKS)."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc.jwk import ECKey, RSAKey
from token_server import TokenServer

from mmcds.dev.servers import FhirSandbox
from mmcds.fhir.client import FhirClient, FhirError
from mmcds.fhir.smart_auth import (
    DEFAULT_SCOPE,
    BackendCredentials,
    BackendServicesAuth,
    TokenRefused,
)
from mmcds.fhir.writeback import send_bundle
from mmcds.service.outbox import Outbox

CLIENT = "mmcds-writeback"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def token_server() -> Iterator[TokenServer]:
    with TokenServer() as server:
        yield server


@pytest.fixture(scope="module")
def protected_fhir(token_server: TokenServer) -> Iterator[FhirSandbox]:
    env = {
        "AUTH_JWKS_URL": token_server.jwks_url,
        "AUTH_ISSUER": token_server.base_url,
        "AUTH_TOKEN_URL": token_server.token_url,
    }
    with FhirSandbox(env=env) as sandbox:
        yield sandbox


@pytest.fixture
def fhir(protected_fhir: FhirSandbox) -> str:
    protected_fhir.reset()
    return protected_fhir.base_url


@pytest.fixture(params=["ES384", "RS384"])
def credentials(request: pytest.FixtureRequest, token_server: TokenServer) -> BackendCredentials:
    key: ECKey | RSAKey = (
        ECKey.generate_key("P-384") if request.param == "ES384" else RSAKey.generate_key(2048)
    )
    creds = BackendCredentials(CLIENT, key, key.thumbprint())
    token_server.register(CLIENT, key, DEFAULT_SCOPE)
    assert creds.alg == request.param
    return creds


def _bundle(key: str) -> dict[str, Any]:
    report = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": "urn:mmcds:analysis", "value": key}],
        "status": "preliminary",
        "code": {"text": "AI diagnosis-support summary (preliminary)"},
    }
    entry = {
        "fullUrl": "urn:uuid:2b0f4c2e-8f57-4a70-9a43-0b8d3c6a1f10",
        "resource": report,
        "request": {
            "method": "POST",
            "url": "DiagnosticReport",
            "ifNoneExist": f"identifier=urn:mmcds:analysis|{key}",
        },
    }
    return {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}


def _reports(fhir: str, auth: httpx.Auth, key: str) -> list[dict[str, Any]]:
    with FhirClient(fhir, auth=auth) as client:
        return client.search("DiagnosticReport", {"identifier": f"urn:mmcds:analysis|{key}"})


def test_sandbox_refuses_write_back_without_a_token(fhir: str) -> None:
    with FhirClient(fhir) as client, pytest.raises(FhirError) as refused:
        client.search("DiagnosticReport", {})
    assert refused.value.status == 401
    # A report sent without credentials stays queued (a credential problem is fixable), never lost.
    with pytest.raises(FhirError):
        send_bundle(fhir, _bundle("no-token"))


def test_write_back_with_a_discovered_endpoint_and_a_cached_token(
    fhir: str, credentials: BackendCredentials, token_server: TokenServer
) -> None:
    auth = BackendServicesAuth(fhir, credentials)  # no token URL: SMART discovery finds it
    sent = send_bundle(fhir, _bundle("k-auth"), auth=auth)
    assert sent.report_id
    assert send_bundle(fhir, _bundle("k-auth"), auth=auth).report_id == sent.report_id
    assert auth.tokens_fetched == 1  # one token served every request of both deliveries
    assert [r["id"] for r in _reports(fhir, auth, "k-auth")] == [sent.report_id]


def test_token_renewed_before_it_expires_and_when_the_server_says_401(
    fhir: str, credentials: BackendCredentials, token_server: TokenServer
) -> None:
    clock = Clock()
    auth = BackendServicesAuth(fhir, credentials, clock=clock, refresh_margin_s=30)
    first = auth.token()
    clock.now += 300 - 29  # inside the margin before expiry: a new token, not a 401 first
    second = auth.token()
    assert second != first and auth.tokens_fetched == 2
    # A token the server no longer accepts though our clock says it is fine (revoked, clock
    # skew): the 401 makes the client fetch a new one and repeat the request once.
    token_server.expires_in = 1
    try:
        clock.now += 1_000
        auth.token()
    finally:
        token_server.expires_in = 300
    clock.now -= 1_000  # our clock: the 1-second token looks valid for a while yet
    time.sleep(1.2)  # but the server's has expired it
    before = auth.tokens_fetched
    assert send_bundle(fhir, _bundle("k-401"), auth=auth).report_id
    assert auth.tokens_fetched == before + 1


def test_wrong_key_is_refused_by_the_token_endpoint_and_the_report_stays_queued(
    fhir: str, credentials: BackendCredentials, token_server: TokenServer, tmp_path: Path
) -> None:
    impostor = ECKey.generate_key("P-384")
    wrong = BackendCredentials(CLIENT, impostor, credentials.kid)
    auth = BackendServicesAuth(fhir, wrong)
    refusals = token_server.refusals
    with pytest.raises(TokenRefused, match="invalid_client"):
        auth.token()
    assert token_server.refusals == refusals + 1
    outbox = Outbox(f"sqlite:///{tmp_path / 'o.db'}")
    outbox.enqueue("k-wrong", fhir, _bundle("k-wrong"))
    (state,) = outbox.deliver(lambda server, bundle: send_bundle(server, bundle, auth=auth))
    assert state.status == "pending" and "invalid_client" in (state.last_error or "")
    # Fixed credentials: the same queued report lands.
    good = BackendServicesAuth(fhir, credentials)
    outbox.retry("k-wrong")
    (state,) = outbox.deliver(lambda server, bundle: send_bundle(server, bundle, auth=good))
    assert state.status == "delivered"
    outbox.close()


def test_key_files_pem_and_jwk(tmp_path: Path) -> None:
    ec = ECKey.generate_key("P-384")
    (tmp_path / "ec.pem").write_bytes(ec.as_pem(private=True))
    rsa = RSAKey.generate_key(2048)
    (tmp_path / "rsa.json").write_text(json.dumps(rsa.as_dict(private=True)))
    assert BackendCredentials.from_file("c", tmp_path / "ec.pem").alg == "ES384"
    assert BackendCredentials.from_file("c", tmp_path / "rsa.json", kid="k1").kid == "k1"


def test_no_token_or_assertion_is_ever_logged(
    fhir: str,
    credentials: BackendCredentials,
    token_server: TokenServer,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    auth = BackendServicesAuth(fhir, credentials)
    outbox = Outbox(f"sqlite:///{tmp_path / 'o.db'}")
    outbox.enqueue("k-log", fhir, _bundle("k-log"))
    (state,) = outbox.deliver(lambda server, bundle: send_bundle(server, bundle, auth=auth))
    assert state.status == "delivered"
    token = auth.token()
    # The service's side (mmcds and its HTTP client); the test's token server is authlib's own.
    ours = ("mmcds", "httpx", "httpcore")
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(ours))
    assert "backend-services token" in logged  # the fetch was logged, without the token
    assert token not in logged and token.split(".")[2] not in logged
    assert not re.search(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", logged)  # no JWT (token or assertion)
    outbox.close()
