"""CDS Hooks JWT verification (CDS Hooks 2.0 §Trusting CDS Clients).

Every hook carries a bearer JWT signed by the CDS client. We accept it only if: the issuer is on
the allowlist; the key comes from that issuer's configured JWKS (re-fetched once on an unknown
``kid``; a ``jku`` header must equal the configured JWKS URL); the algorithm is asymmetric
(``none`` and HS* are refused, so a public key can never be used as an HMAC secret); ``aud`` is
exactly this endpoint's URL; ``exp``/``iat`` are sane; and the ``jti`` was not seen before.

Failures raise ``AuthError`` whose message is for the log (never the token itself); the HTTP
answer is a bare 401.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry

from mmcds.errors import AuthError
from mmcds.service.replay import MemoryReplayCache, SeenTokens

log = logging.getLogger(__name__)

ASYMMETRIC_ALGS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
# Built once: joserfc builds a registry on every call that is handed a list of algorithms.
_JWS = JWSRegistry(algorithms=ASYMMETRIC_ALGS)
LEEWAY_S = 60
MAX_LIFETIME_S = 3600


class JwksSource:
    """One trusted issuer's keys: inline JWKS JSON, or a URL fetched and cached."""

    def __init__(self, spec: str, http: httpx.Client) -> None:
        self.url = None if spec.lstrip().startswith("{") else spec
        self._http = http
        self._keys = KeySet.import_key_set(json.loads(spec)) if self.url is None else None
        self._fetched_at = 0.0

    def keys(self, kid: str | None) -> KeySet:
        if self._keys is None or (kid and not self._has(kid) and self._may_refetch()):
            self._fetch()
        assert self._keys is not None
        return self._keys

    def _has(self, kid: str) -> bool:
        return self._keys is not None and any(k.kid == kid for k in self._keys.keys)

    def _may_refetch(self) -> bool:
        # An unknown kid may be a key rotation; refetch, but not more than every 30 s so a
        # stream of forged kids cannot turn us into a load generator against the issuer.
        return self.url is not None and time.monotonic() - self._fetched_at > 30

    def _fetch(self) -> None:
        assert self.url is not None
        self._fetched_at = time.monotonic()
        try:
            response = self._http.get(self.url)
            response.raise_for_status()
            self._keys = KeySet.import_key_set(response.json())
        except (httpx.HTTPError, ValueError, JoseError) as exc:
            raise AuthError(f"JWKS of issuer unavailable: {type(exc).__name__}") from exc


class JwtVerifier:
    def __init__(
        self,
        trusted_issuers: dict[str, str],
        *,
        replay: SeenTokens | None = None,
        clock: Callable[[], float] = time.time,
        http: httpx.Client | None = None,
        replay_timeout_s: float | None = None,
    ) -> None:
        self._http = http or httpx.Client(timeout=5.0)
        self._sources = {iss: JwksSource(spec, self._http) for iss, spec in trusted_issuers.items()}
        self._replay = replay or MemoryReplayCache(clock)
        self._clock = clock
        self._replay_timeout_s = replay_timeout_s

    def verify(self, authorization: str | None, audience: str) -> dict[str, Any]:
        """Claims of a valid token from an ``Authorization: Bearer`` header, or ``AuthError``."""
        claims = self._checked_claims(authorization, audience)
        if not self._replay.check_and_add(*_replay_entry(claims)):
            raise AuthError("jti replayed")
        return claims

    async def verify_async(self, authorization: str | None, audience: str) -> dict[str, Any]:
        """``verify`` for the event loop: the replay claim does not block it, and a replay
        cache that does not answer within ``replay_timeout_s`` refuses the token (fails closed)
        instead of holding the caller."""
        claims = self._checked_claims(authorization, audience)
        try:
            async with asyncio.timeout(self._replay_timeout_s):
                fresh = await self._replay.check_and_add_async(*_replay_entry(claims))
        except TimeoutError as exc:
            log.error("replay cache did not answer within %s s", self._replay_timeout_s)
            raise AuthError("replay cache did not answer in time") from exc
        if not fresh:
            raise AuthError("jti replayed")
        return claims

    def _checked_claims(self, authorization: str | None, audience: str) -> dict[str, Any]:
        """Everything but the replay check (which must come last: only a token that passed
        every other check may use up its ``jti``)."""
        if not authorization or not authorization.startswith("Bearer "):
            raise AuthError("missing bearer token")
        token = authorization.removeprefix("Bearer ").strip()
        try:
            unverified = jws.extract_compact(token.encode(), registry=_JWS)
            header = unverified.protected
            claims = json.loads(unverified.payload)
        except (JoseError, ValueError) as exc:
            raise AuthError(f"malformed JWT: {type(exc).__name__}") from exc
        if header.get("alg") not in ASYMMETRIC_ALGS:
            raise AuthError(f"algorithm {header.get('alg')!r} not accepted")
        iss = claims.get("iss") if isinstance(claims, dict) else None
        source = self._sources.get(str(iss))
        if source is None:
            raise AuthError("issuer not trusted")
        if "jku" in header and header["jku"] != source.url:
            raise AuthError("jku not on the allowlist for this issuer")
        # The token parsed above is the one verified (not parsed a second time by
        # ``jwt.decode``): the claims returned are those of the payload the signature covers.
        try:
            valid = jws.validate_compact(unverified, source.keys(header.get("kid")), registry=_JWS)
        except JoseError as exc:
            raise AuthError(f"signature rejected: {type(exc).__name__}") from exc
        if not valid:
            raise AuthError("signature rejected: BadSignatureError")
        self._check_claims(claims, audience)
        return claims

    def _check_claims(self, claims: dict[str, Any], audience: str) -> None:
        now = self._clock()
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if audience not in auds:
            raise AuthError("aud does not match this endpoint")
        exp, iat, jti = claims.get("exp"), claims.get("iat"), claims.get("jti")
        if not isinstance(exp, int | float) or not isinstance(iat, int | float):
            raise AuthError("exp and iat are required")
        if exp < now - LEEWAY_S:
            raise AuthError("token expired")
        if iat > now + LEEWAY_S or exp - iat > MAX_LIFETIME_S:
            raise AuthError("iat in the future or lifetime too long")
        if not isinstance(jti, str) or not jti:
            raise AuthError("jti is required")


def _replay_entry(claims: dict[str, Any]) -> tuple[str, float]:
    """The replay cache's key for a checked token, and until when it must be remembered."""
    return f"{claims['iss']}|{claims['jti']}", float(claims["exp"]) + LEEWAY_S


def sign_hook_jwt(
    key: Any, *, issuer: str, audience: str, kid: str, alg: str = "ES384", ttl_s: int = 300
) -> str:
    """A CDS client's token for one hook call (used by the demo and the tests, as an EHR would)."""
    import uuid

    now = int(time.time())
    claims = {
        "iss": issuer,
        "sub": "mmcds-demo",
        "aud": audience,
        "exp": now + ttl_s,
        "iat": now,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode({"alg": alg, "typ": "JWT", "kid": kid}, claims, key, algorithms=[alg])
