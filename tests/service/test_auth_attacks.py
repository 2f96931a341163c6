"""Attacks on the service's front door, as an independent client would try them.

The 13 JWT attacks of issue 24, on every hook endpoint kind and on the feedback endpoint, and
fhirServer SSRF attempts: each is refused, and none reaches a FHIR client -- checked on the
sandbox's request log, on a counting ``FhirClient`` (the real class, counted), and for the
loopback case on a real listening socket that counts connections.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from mmcds.dev.servers import FhirSandbox
from mmcds.fhir.client import FhirClient
from mmcds.service import analysis

ISSUER = "https://ehr.test.mmcds.local"  # tests/service/conftest.py
KID = "test-key-1"
BASE = "http://testserver"
HOOK = "/cds-services/mmcds-patient-view"
FEEDBACK = "/cds-services/mmcds-patient-view/feedback"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    head = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{head}.{_b64(signature)}"


def _claims(audience: str, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": "attacker",
        "aud": audience,
        "exp": now + 300,
        "iat": now,
        "jti": str(uuid.uuid4()),
    }
    return {**claims, **changes}


def _signed(key: Any, claims: dict[str, Any], **header: Any) -> str:
    head = {"alg": "ES384", "typ": "JWT", "kid": KID, **header}
    return jwt.encode(head, claims, key, algorithms=[head["alg"]])


Forge = Callable[[ECKey, str], str]  # (the EHR's real key, audience) -> token


def _hs256_with_public_key(key: ECKey, aud: str) -> str:
    header = {"alg": "HS256", "typ": "JWT", "kid": KID}
    head = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims(aud)).encode())}"
    secret = key.as_pem(private=False)
    return f"{head}.{_b64(hmac.new(secret, head.encode(), hashlib.sha256).digest())}"


def _other_endpoint(key: ECKey, aud: str) -> str:
    other = aud.replace("mmcds-patient-view", "mmcds-order-sign")
    if other == aud:
        raise AssertionError("audience names no service")
    return _signed(key, _claims(other))


ATTACKS: dict[str, Forge] = {
    "alg-none": lambda key, aud: _unsigned({"alg": "none", "typ": "JWT"}, _claims(aud)),
    "hs256-with-public-key": _hs256_with_public_key,
    "unknown-kid": lambda key, aud: _signed(key, _claims(aud), kid="no-such-kid"),
    "foreign-jku": lambda key, aud: _signed(
        ECKey.generate_key("P-384"), _claims(aud), jku="https://attacker.example/jwks.json"
    ),
    "other-key": lambda key, aud: _signed(ECKey.generate_key("P-384"), _claims(aud)),
    "other-key-rsa": lambda key, aud: _signed(RSAKey.generate_key(2048), _claims(aud), alg="RS384"),
    "untrusted-iss": lambda key, aud: _signed(key, _claims(aud, iss="https://attacker.example")),
    "wrong-aud": lambda key, aud: _signed(key, _claims("https://attacker.example/cds-services")),
    "another-endpoint": _other_endpoint,
    "expired": lambda key, aud: _signed(
        key, _claims(aud, exp=int(time.time()) - 600, iat=int(time.time()) - 900)
    ),
    "future-iat": lambda key, aud: _signed(
        key, _claims(aud, iat=int(time.time()) + 3600, exp=int(time.time()) + 3900)
    ),
    "no-jti": lambda key, aud: _signed(key, {k: v for k, v in _claims(aud).items() if k != "jti"}),
    "malformed": lambda key, aud: "not.a.jwt",
}


class CountingFhirClient(FhirClient):
    """The real client, counting how many were made (every FHIR call needs one)."""

    made = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        type(self).made += 1
        super().__init__(*args, **kwargs)


@pytest.fixture
def fhir_clients(monkeypatch: pytest.MonkeyPatch) -> type[CountingFhirClient]:
    CountingFhirClient.made = 0
    monkeypatch.setattr(analysis, "FhirClient", CountingFhirClient)
    return CountingFhirClient


def _hook_body(fhir_url: str) -> dict[str, Any]:
    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": fhir_url,
        "context": {"patientId": "p1", "userId": "Practitioner/1"},
    }


def _feedback_body() -> dict[str, Any]:
    return {
        "feedback": [
            {
                "card": str(uuid.uuid4()),
                "outcome": "overridden",
                "overrideReason": {
                    "reason": {"code": "disagree", "system": "urn:mmcds:override-reason"},
                    "userComment": "attacker",
                },
                "outcomeTimestamp": "2026-12-02T10:00:00Z",
            }
        ]
    }


@pytest.fixture(params=[HOOK, FEEDBACK], ids=["hook", "feedback"])
def endpoint(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _no_fhir_call(sandbox: FhirSandbox, clients: type[CountingFhirClient]) -> None:
    assert sandbox.requests() == []
    assert clients.made == 0


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_jwt_attack_is_refused(
    attack: str,
    endpoint: str,
    call_hook: Any,
    ehr_key: ECKey,
    fhir_url: str,
    fhir_sandbox: FhirSandbox,
    fhir_clients: type[CountingFhirClient],
) -> None:
    token = ATTACKS[attack](ehr_key, f"{BASE}{endpoint}")
    body = _hook_body(fhir_url) if endpoint == HOOK else _feedback_body()
    response = call_hook.post(endpoint, body, token=token)
    assert response.status_code == 401, (attack, response.text)
    assert response.json() == {}  # no detail for the attacker
    _no_fhir_call(fhir_sandbox, fhir_clients)
    feedback = call_hook.client.app.state.feedback
    assert feedback.list(service_id="mmcds-patient-view") == []


def test_missing_token_is_refused(
    endpoint: str,
    call_hook: Any,
    fhir_url: str,
    fhir_sandbox: FhirSandbox,
    fhir_clients: type[CountingFhirClient],
) -> None:
    body = _hook_body(fhir_url) if endpoint == HOOK else _feedback_body()
    for headers in ({}, {"Authorization": "Basic dXNlcjpwdw=="}, {"Authorization": "Bearer "}):
        response = call_hook.client.post(endpoint, json=body, headers=headers)
        assert response.status_code == 401
    _no_fhir_call(fhir_sandbox, fhir_clients)


def test_replayed_token_is_refused(
    endpoint: str,
    call_hook: Any,
    fhir_sandbox: FhirSandbox,
    fhir_clients: type[CountingFhirClient],
) -> None:
    token = call_hook.token(endpoint)
    # accepted once: a hook without patientId stops at validation, before any FHIR call
    body = _feedback_body() if endpoint == FEEDBACK else {**_hook_body("x"), "context": {}}
    first = call_hook.post(endpoint, body, token=token)
    assert first.status_code == (200 if endpoint == FEEDBACK else 400), first.text
    again = call_hook.post(endpoint, body, token=token)
    assert again.status_code == 401
    _no_fhir_call(fhir_sandbox, fhir_clients)


@pytest.fixture
def listener() -> Iterator[tuple[int, list[int]]]:
    """A real TCP server on loopback that counts the connections it accepts."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    accepted: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1], accepted
    stop.set()
    thread.join()
    sock.close()


SSRF = {
    "loopback": "http://127.0.0.1:{port}/fhir/R4",
    "loopback-name": "http://localhost:{port}/fhir/R4",
    "link-local-metadata": "http://169.254.169.254/latest/meta-data",
    "not-allow-listed": "https://fhir.attacker.example/R4",
    "userinfo-trick": "http://127.0.0.1:{port}@fhir.attacker.example/R4",
}


@pytest.mark.parametrize("target", list(SSRF))
def test_fhir_server_ssrf_is_refused(
    target: str,
    call_hook: Any,
    listener: tuple[int, list[int]],
    fhir_sandbox: FhirSandbox,
    fhir_clients: type[CountingFhirClient],
) -> None:
    port, accepted = listener
    body = _hook_body(SSRF[target].format(port=port))
    body["fhirAuthorization"] = {"access_token": "secret-ehr-token", "token_type": "Bearer"}
    response = call_hook(body)
    assert response.status_code == 403, response.text
    assert "allowlist" in response.json()["error"]
    assert "secret-ehr-token" not in response.text
    time.sleep(0.3)  # a connection attempt would have been accepted by now
    assert accepted == []
    _no_fhir_call(fhir_sandbox, fhir_clients)
