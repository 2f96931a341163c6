"""Opaque, expiring review links and clinician sessions; clinicians' password hashes.

A card's review link is ``<public base>/review/<token>``. The token is AES-256-GCM
(``cryptography``) over a small JSON claim set, with a random 96-bit nonce, under a key derived
from the service's review secret: encrypted, so the URL reveals nothing (not even the analysis
id), and authenticated, so a forged or altered token does not decrypt. (A compact JWE with
``dir``/``A256GCM`` is the same construction; joserfc's took 0.5 ms a token, which is most of
the worklist's time over 500 rows.)
It carries the analysis id, the card's uuid and service id (for feedback) and an expiry. The
worklist's session cookie is the same kind of token with the clinician's user name.

Passwords are stored as scrypt hashes (``hashlib.scrypt``, RFC 7914), never in clear.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mmcds.errors import AuthError
from mmcds.settings import Settings

SECRET_FILE = "review-secret"
_AAD = b"mmcds-review-token-v1"
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class TokenRefused(AuthError):
    """A review token or session that is expired, forged, altered or of the wrong kind."""


def review_key(settings: Settings) -> bytes:
    """The 256-bit key derived from the configured secret, or from one created once under
    ``MMCDS_HOME`` (exclusive create: concurrent workers end up with the same file)."""
    if settings.review_secret is not None and settings.review_secret.get_secret_value():
        secret = settings.review_secret.get_secret_value().encode("utf-8")
        if len(secret) < 32:
            raise ValueError("MMCDS_REVIEW_SECRET must be at least 32 characters")
    else:
        path = Path(settings.home) / SECRET_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            secret = path.read_bytes().strip()
        else:
            secret = secrets.token_urlsafe(48).encode("ascii")
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
    return hashlib.sha256(b"mmcds-review|" + secret).digest()


@dataclass(frozen=True)
class ReviewGrant:
    """What a review link opens: one analysis, and the card it was shown on (if any)."""

    analysis_id: str
    card_uuid: str | None
    service_id: str | None
    expires: int


class Tokens:
    """Mints and opens review links and session cookies with one key."""

    def __init__(self, key: bytes, *, link_ttl_s: int, session_ttl_s: int) -> None:
        self.aead = AESGCM(key)
        self.link_ttl_s = link_ttl_s
        self.session_ttl_s = session_ttl_s

    @classmethod
    def from_settings(cls, settings: Settings) -> Tokens:
        return cls(
            review_key(settings),
            link_ttl_s=settings.review_link_ttl_s,
            session_ttl_s=settings.session_ttl_s,
        )

    def _seal(self, claims: Mapping[str, object]) -> str:
        nonce = secrets.token_bytes(12)
        sealed = self.aead.encrypt(nonce, json.dumps(claims).encode("utf-8"), _AAD)
        return _b64(nonce + sealed)

    def _open(self, token: str, kind: str) -> dict[str, object]:
        if len(token) > 2048:
            raise TokenRefused("token too long")
        try:
            raw = _unb64(token)
            claims = json.loads(self.aead.decrypt(raw[:12], raw[12:], _AAD))
        except (InvalidTag, ValueError, TypeError) as exc:
            raise TokenRefused("token does not open with this service's key") from exc
        if not isinstance(claims, dict) or claims.get("k") != kind:
            raise TokenRefused(f"not a {kind} token")
        exp = claims.get("exp")
        if not isinstance(exp, int) or exp <= time.time():
            raise TokenRefused("token expired")
        return claims

    def review_link(
        self,
        analysis_id: str,
        *,
        card_uuid: str | None = None,
        service_id: str | None = None,
        ttl_s: int | None = None,
    ) -> str:
        exp = int(time.time()) + (self.link_ttl_s if ttl_s is None else ttl_s)
        claims = {"k": "review", "a": analysis_id, "c": card_uuid, "s": service_id, "exp": exp}
        return self._seal(claims)

    def open_review(self, token: str) -> ReviewGrant:
        c = self._open(token, "review")
        if not isinstance(c.get("a"), str):
            raise TokenRefused("review token without an analysis")
        card, service = c.get("c"), c.get("s")
        return ReviewGrant(
            analysis_id=str(c["a"]),
            card_uuid=card if isinstance(card, str) else None,
            service_id=service if isinstance(service, str) else None,
            expires=int(c["exp"]),  # type: ignore[call-overload]
        )

    def session(self, user: str) -> str:
        exp = int(time.time()) + self.session_ttl_s
        return self._seal({"k": "session", "u": user, "exp": exp})

    def open_session(self, token: str) -> str:
        user = self._open(token, "session").get("u")
        if not isinstance(user, str):
            raise TokenRefused("session without a user")
        return user


# --- passwords ----------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash``: what ``MMCDS_CLINICIANS`` holds for each user."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, dklen=32, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${_b64(salt)}${_b64(digest)}"


# checked against when the user does not exist, so the answer takes as long either way
_DUMMY = hash_password("not a password", salt=b"0" * 16)


def check_password(clinicians: dict[str, str], user: str, password: str) -> bool:
    stored = clinicians.get(user) or _DUMMY
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(
            password.encode("utf-8"), salt=_unb64(salt), n=int(n), r=int(r), p=int(p), dklen=32
        )
    except ValueError:
        return False
    return hmac.compare_digest(got, _unb64(digest)) and user in clinicians
