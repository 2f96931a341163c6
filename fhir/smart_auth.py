"""SMART Backend Services credentials for write-back (``client_credentials`` + ``private_key_jwt``).

The hook's access token belongs to the clinician's session and expires in minutes; a report
retried an hour later needs the service's own credential. Per SMART App Launch 2.x "Backend
Services": the token endpoint is discovered from ``[fhir base]/.well-known/smart-configuration``,
the client authenticates with a short-lived JWT signed by its private key (ES384 or RS384; the
EHR holds the public key or a JWKS URL), and gets a bearer token for system scopes. The token is
cached until shortly before it expires and fetched anew when the FHIR server answers 401.

Tokens and assertions are secrets: they never appear in a log line or an error message.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

from mmcds.errors import AuthError, ConfigurationError, UpstreamUnavailable

log = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME_S = 300  # SMART: no more than five minutes
#: Write-back's needs in SMART v2 scope syntax: create the report's resources, search for an
#: earlier report (and its Observations) to supersede, update them.
DEFAULT_SCOPE = (
    "system/DiagnosticReport.crus system/Observation.crus system/Media.crs system/Binary.c "
    "system/Device.crs system/Provenance.c"
)


class TokenRefused(AuthError):
    """The token endpoint refused the client (wrong key, unknown client, scope not granted)."""


class TokenUnavailable(AuthError, UpstreamUnavailable):
    """The authorisation server could not be reached: retry later."""


@dataclass(frozen=True)
class BackendCredentials:
    """A registered backend client: its id, its private key (EC P-384 or RSA), the key id the
    EHR knows it by, the scopes to ask for, and (optional) the token URL if not discovered."""

    client_id: str
    key: ECKey | RSAKey
    kid: str
    scope: str = DEFAULT_SCOPE
    token_url: str | None = None

    @property
    def alg(self) -> str:
        return "ES384" if isinstance(self.key, ECKey) else "RS384"

    @classmethod
    def from_file(
        cls,
        client_id: str,
        path: Path,
        *,
        kid: str = "",
        scope: str = DEFAULT_SCOPE,
        token_url: str | None = None,
    ) -> BackendCredentials:
        """The private key from a PEM or JWK (JSON) file."""
        try:
            key = _read_key(path.read_bytes())
        except (OSError, ValueError, JoseError) as exc:
            raise ConfigurationError(
                f"cannot read the write-back private key {path}: {exc}"
            ) from exc
        if not isinstance(key, ECKey | RSAKey) or not key.is_private:
            raise ConfigurationError(f"{path} must hold an EC P-384 or RSA private key")
        if isinstance(key, ECKey) and key.curve_name != "P-384":
            raise ConfigurationError(f"{path}: ES384 needs a P-384 key, not {key.curve_name}")
        return cls(client_id, key, kid or key.thumbprint(), scope, token_url or None)


def _read_key(data: bytes) -> ECKey | RSAKey:
    if data.lstrip().startswith(b"{"):
        jwk = json.loads(data)
        if jwk.get("kty") == "EC":
            return ECKey.import_key(jwk)
        if jwk.get("kty") == "RSA":
            return RSAKey.import_key(jwk)
        raise ValueError(f"key type {jwk.get('kty')!r} is neither EC nor RSA")
    try:
        return ECKey.import_key(data)
    except (ValueError, JoseError):
        return RSAKey.import_key(data)


def discover_token_url(http: httpx.Client, fhir_base: str) -> str:
    """The ``token_endpoint`` of ``[fhir_base]/.well-known/smart-configuration``."""
    url = f"{fhir_base.rstrip('/')}/.well-known/smart-configuration"
    try:
        response = http.get(url, headers={"Accept": "application/json"})
    except httpx.TransportError as exc:
        raise TokenUnavailable(
            f"SMART configuration {url} unreachable: {type(exc).__name__}"
        ) from None
    if response.status_code != 200:
        raise TokenRefused(f"SMART configuration {url} answered {response.status_code}")
    config = response.json()
    methods = config.get("token_endpoint_auth_methods_supported")
    if methods is not None and "private_key_jwt" not in methods:
        raise TokenRefused(f"{url}: the server does not accept private_key_jwt ({methods})")
    token_url = config.get("token_endpoint")
    if not isinstance(token_url, str) or not token_url:
        raise TokenRefused(f"{url} names no token_endpoint")
    return token_url


class BackendServicesAuth(httpx.Auth):
    """``httpx.Auth`` that adds the backend-services bearer token, cached, renewed before it
    expires and once more when the FHIR server answers 401. Thread-safe; one per FHIR server."""

    def __init__(
        self,
        fhir_base: str,
        credentials: BackendCredentials,
        *,
        timeout_s: float = 10.0,
        refresh_margin_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fhir_base = fhir_base.rstrip("/")
        self.credentials = credentials
        self.refresh_margin_s = refresh_margin_s
        self._clock = clock
        self._http = httpx.Client(timeout=timeout_s)
        self._lock = threading.Lock()
        self._token_url = credentials.token_url
        self._token: str | None = None
        self._expires_at = 0.0
        self.tokens_fetched = 0  # for tests and monitoring: how often the endpoint was asked

    def close(self) -> None:
        self._http.close()

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self.token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            # Revoked, rotated or expired early: one fresh token, one more try.
            self.invalidate(token)
            request.headers["Authorization"] = f"Bearer {self.token()}"
            yield request

    def invalidate(self, token: str) -> None:
        with self._lock:
            if self._token == token:
                self._token = None

    def token(self) -> str:
        """A token valid for at least ``refresh_margin_s`` more seconds (fetched if need be)."""
        with self._lock:
            if self._token is None or self._clock() >= self._expires_at - self.refresh_margin_s:
                self._token, self._expires_at = self._fetch()
            return self._token

    def assertion(self, token_url: str) -> str:
        """The signed client assertion (RFC 7523) for one token request."""
        now = int(time.time())  # the real time: the server checks it (the clock is for caching)
        c = self.credentials
        claims = {
            "iss": c.client_id,
            "sub": c.client_id,
            "aud": token_url,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_S,
            "jti": str(uuid.uuid4()),
        }
        header = {"alg": c.alg, "kid": c.kid, "typ": "JWT"}
        return jwt.encode(header, claims, c.key, algorithms=[c.alg])

    def _fetch(self) -> tuple[str, float]:
        if self._token_url is None:
            self._token_url = discover_token_url(self._http, self.fhir_base)
        form = {
            "grant_type": "client_credentials",
            "scope": self.credentials.scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.assertion(self._token_url),
        }
        try:
            response = self._http.post(self._token_url, data=form)
        except httpx.TransportError as exc:
            raise TokenUnavailable(
                f"token endpoint {self._token_url} unreachable: {type(exc).__name__}"
            ) from None
        if response.status_code >= 500:
            raise TokenUnavailable(f"token endpoint {self._token_url}: {response.status_code}")
        body: dict[str, Any] = _json(response)
        if response.status_code != 200 or not isinstance(body.get("access_token"), str):
            # error and error_description (RFC 6749 §5.2) say why; they carry no secret.
            raise TokenRefused(
                f"token endpoint {self._token_url} refused client {self.credentials.client_id}: "
                f"{response.status_code} {body.get('error', '')} "
                f"{str(body.get('error_description', ''))[:200]}".strip()
            )
        expires_in = float(body.get("expires_in") or 300)
        self.tokens_fetched += 1
        log.info(
            "backend-services token for %s: scope %r, expires in %.0f s",
            self.fhir_base,
            body.get("scope", ""),
            expires_in,
        )
        return body["access_token"], self._clock() + expires_in


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
