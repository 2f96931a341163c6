"""A database that stops answering, on demand: a real PostgreSQL table held locked by another
session (every statement on it waits), while the test awaits the call under test and counts how
often the event loop ran meanwhile (a call that blocks the loop lets it run never)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg


@dataclass(frozen=True)
class Schema:
    """A PostgreSQL schema of one test's own (the ``pg_schema`` fixture)."""

    name: str
    postgres_url: str  # SQLAlchemy URL of the test database

    @property
    def url(self) -> str:
        """SQLAlchemy URL whose connections work in this schema."""
        return f"{self.postgres_url}?options=-csearch_path%3D{self.name}"

    @property
    def conninfo(self) -> str:
        return self.postgres_url.replace("+psycopg", "")


@dataclass(frozen=True)
class Stalled:
    result: Any
    error: BaseException | None
    elapsed_s: float
    loop_ticks: int  # 10 ms sleeps the event loop completed while the call ran


async def while_locked(schema: Schema, table: str, call: Callable[[], Awaitable[Any]]) -> Stalled:
    """Await ``call()`` while another session holds ``table`` locked; the lock goes once the
    call returns (or after 3 s, so that a call that blocks the loop ends too)."""
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        with psycopg.connect(schema.conninfo, options=f"-c search_path={schema.name}") as locker:
            locker.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
            locked.set()
            release.wait(timeout=3.0)
            locker.rollback()

    holder = threading.Thread(target=hold)
    holder.start()
    assert locked.wait(timeout=10)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.ensure_future(tick())
    started = time.perf_counter()
    result, error = None, None
    try:
        result = await call()
    except Exception as exc:  # returned to the test, which asserts what it expects
        error = exc
    elapsed = time.perf_counter() - started
    ticking.cancel()
    release.set()  # the stall ends: what waited on the lock completes
    await asyncio.to_thread(holder.join)
    return Stalled(result, error, elapsed, ticks)
