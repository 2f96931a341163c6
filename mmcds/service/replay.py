"""The JWT replay cache shared by every process and replica of the service.

A ``jti`` accepted by one worker must be refused by all others until the token expires, so the
cache cannot live in process memory once ``mmcds serve --workers N`` or several replicas run.
Chosen by ``MMCDS_REPLAY_CACHE``: ``database`` (the service's database: SQLite for one host,
PostgreSQL across hosts; the default), ``redis`` (``MMCDS_REDIS_URL``), or ``memory`` (one
process only; tests and single-process development).

Keys are hashed (a jti is attacker-chosen text of any length) and every store fails closed: if
the cache cannot be read, the token is refused (``AuthError``), never let through.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from sqlalchemy import Column, Float, MetaData, String, Table, delete
from sqlalchemy.exc import SQLAlchemyError

from mmcds.db import create_tables, insert_or_replace_where, make_engine
from mmcds.errors import AuthError
from mmcds.settings import Settings

log = logging.getLogger(__name__)
PURGE_EVERY_S = 60.0


class SeenTokens(Protocol):
    def check_and_add(self, key: str, expires_at: float) -> bool:
        """True if ``key`` is new (and is now recorded until ``expires_at``), False if seen."""
        ...


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class MemoryReplayCache:
    """In-process: correct for one process only."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def check_and_add(self, key: str, expires_at: float) -> bool:
        now = self._clock()
        with self._lock:
            if len(self._seen) > 10_000:
                self._seen = {k: exp for k, exp in self._seen.items() if exp > now}
            if key in self._seen and self._seen[key] > now:
                return False
            self._seen[key] = expires_at
            return True


class DatabaseReplayCache:
    """One row per seen token in ``mmcds_seen_jti``; the primary key makes check-and-add one
    atomic insert, whichever process or host runs it."""

    def __init__(self, url: str, clock: Callable[[], float] = time.time) -> None:
        self.engine = make_engine(url, purpose="replay cache")
        self.table = Table(
            "mmcds_seen_jti",
            MetaData(),
            Column("key", String(64), primary_key=True),
            Column("expires_at", Float, nullable=False, index=True),
        )
        create_tables(self.engine, self.table, purpose="replay cache")
        self._clock = clock
        self._purged = 0.0

    def check_and_add(self, key: str, expires_at: float) -> bool:
        now, t = self._clock(), self.table
        # One statement on the hook's path: insert, or take over this key's row only if it has
        # expired (an expired entry must not block its key forever); a row comes back only if
        # this call claimed the key. Other expired rows are purged now and then.
        claim = insert_or_replace_where(
            self.engine,
            t,
            ["key"],
            {"key": _digest(key), "expires_at": expires_at},
            where=t.c.expires_at < now,
        ).returning(t.c.key)
        try:
            with self.engine.begin() as conn:
                if now - self._purged > PURGE_EVERY_S:
                    self._purged = now
                    conn.execute(delete(t).where(t.c.expires_at < now))
                return conn.execute(claim).first() is not None
        except SQLAlchemyError as exc:
            log.error("replay cache unavailable: %s", type(exc).__name__)
            raise AuthError("replay cache unavailable") from exc


class RedisReplayCache:
    """``SET key NX EXAT``: atomic in Redis, expires with the token."""

    def __init__(self, url: str) -> None:
        import redis

        self._errors = (redis.RedisError,)
        self._redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    def check_and_add(self, key: str, expires_at: float) -> bool:
        try:
            added = self._redis.set(
                f"mmcds:jti:{_digest(key)}", 1, nx=True, exat=int(expires_at) + 1
            )
        except self._errors as exc:
            log.error("replay cache unavailable: %s", type(exc).__name__)
            raise AuthError("replay cache unavailable") from exc
        return bool(added)


def replay_cache(settings: Settings) -> SeenTokens:
    if settings.replay_cache == "redis":
        return RedisReplayCache(settings.redis_url)
    if settings.replay_cache == "memory":
        return MemoryReplayCache()
    return DatabaseReplayCache(settings.database_url)
