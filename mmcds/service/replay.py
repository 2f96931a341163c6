"""The JWT replay cache shared by every process and replica of the service.

A ``jti`` accepted by one worker must be refused by all others until the token expires, so the
cache cannot live in process memory once ``mmcds serve --workers N`` or several replicas run.
Chosen by ``MMCDS_REPLAY_CACHE``: ``database`` (the service's database: SQLite for one host,
PostgreSQL across hosts; the default), ``redis`` (``MMCDS_REDIS_URL``), or ``memory`` (one
process only; tests and single-process development).

Keys are hashed (a jti is attacker-chosen text of any length) and every store fails closed: if
the cache cannot be read, the token is refused (``AuthError``), never let through.

Hooks claim through ``check_and_add_async``, which never blocks the event loop: Redis through
its asyncio client, the database through a group commit (the claims of concurrent hooks in one
transaction, in a worker thread).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis
import redis.asyncio
from sqlalchemy import Column, Float, MetaData, String, Table, bindparam, delete
from sqlalchemy.exc import SQLAlchemyError

from mmcds.db import create_tables, insert_or_replace_where, make_engine
from mmcds.errors import AuthError
from mmcds.service.group_commit import GroupCommit
from mmcds.settings import Settings

log = logging.getLogger(__name__)
PURGE_EVERY_S = 60.0


class SeenTokens(Protocol):
    def check_and_add(self, key: str, expires_at: float) -> bool:
        """True if ``key`` is new (and is now recorded until ``expires_at``), False if seen."""
        ...

    async def check_and_add_async(self, key: str, expires_at: float) -> bool:
        """``check_and_add`` for the event loop."""
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

    async def check_and_add_async(self, key: str, expires_at: float) -> bool:
        return self.check_and_add(key, expires_at)  # a dict lookup: no reason to leave the loop


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
        t = self.table
        # One statement: insert, or take over a key's row only if it has expired (an expired
        # entry must not block its key forever); rows come back only for the keys this call
        # claimed. Other expired rows are purged now and then.
        self._claim = insert_or_replace_where(
            self.engine, t, ["key"], ["key", "expires_at"], where=t.c.expires_at < bindparam("now")
        ).returning(t.c.key)
        self._clock = clock
        self._purged = 0.0
        self._claims: GroupCommit[tuple[str, float], bool] = GroupCommit(self.claim_many)

    def check_and_add(self, key: str, expires_at: float) -> bool:
        return self.claim_many([(key, expires_at)])[0]

    async def check_and_add_async(self, key: str, expires_at: float) -> bool:
        return (await self._claims.submit([(key, expires_at)]))[0]

    def claim_many(self, claims: list[tuple[str, float]]) -> list[bool]:
        """Claim each (key, expires_at) in one transaction; True where this call claimed the
        key. A key repeated among ``claims`` is claimed by its first occurrence only."""
        now, t = self._clock(), self.table
        rows: dict[str, float] = {}
        for key, expires_at in claims:
            rows.setdefault(_digest(key), expires_at)
        params = [{"key": k, "expires_at": e, "now": now} for k, e in rows.items()]
        try:
            with self.engine.begin() as conn:
                if now - self._purged > PURGE_EVERY_S:
                    self._purged = now
                    conn.execute(delete(t).where(t.c.expires_at < now))
                won = set(conn.execute(self._claim, params).scalars())
        except SQLAlchemyError as exc:
            log.error("replay cache unavailable: %s", type(exc).__name__)
            raise AuthError("replay cache unavailable") from exc
        first: set[str] = set()
        out = []
        for key, _ in claims:
            digest = _digest(key)
            out.append(digest in won and digest not in first)
            first.add(digest)
        return out


class RedisReplayCache:
    """``SET key NX EXAT``: atomic in Redis, expires with the token."""

    def __init__(self, url: str) -> None:
        self._errors = (redis.RedisError,)
        self._url = url
        self._redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        # An asyncio client's connections belong to the event loop that opened them: one
        # client per loop (a service process runs one loop; tests may run several).
        self._async: tuple[asyncio.AbstractEventLoop, redis.asyncio.Redis] | None = None

    def check_and_add(self, key: str, expires_at: float) -> bool:
        try:
            added = self._redis.set(_redis_key(key), 1, nx=True, exat=int(expires_at) + 1)
        except self._errors as exc:
            log.error("replay cache unavailable: %s", type(exc).__name__)
            raise AuthError("replay cache unavailable") from exc
        return bool(added)

    async def check_and_add_async(self, key: str, expires_at: float) -> bool:
        try:
            added = await self._client().set(_redis_key(key), 1, nx=True, exat=int(expires_at) + 1)
        except self._errors as exc:
            log.error("replay cache unavailable: %s", type(exc).__name__)
            raise AuthError("replay cache unavailable") from exc
        return bool(added)

    def _client(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            client = redis.asyncio.Redis.from_url(
                self._url, socket_timeout=2.0, socket_connect_timeout=2.0
            )
            self._async = (loop, client)
        return self._async[1]


def _redis_key(key: str) -> str:
    return f"mmcds:jti:{_digest(key)}"


def replay_cache(settings: Settings) -> SeenTokens:
    if settings.replay_cache == "redis":
        return RedisReplayCache(settings.redis_url)
    if settings.replay_cache == "memory":
        return MemoryReplayCache()
    return DatabaseReplayCache(settings.database_url)
