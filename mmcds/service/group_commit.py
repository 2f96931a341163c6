"""Group commit: many concurrent callers' rows written in one blocking transaction.

A hook must not answer before its card links are stored (feedback on a card names only the
card), but one transaction per hook made that write a quarter of a warm hook's CPU under load
(py-spy on ``benchmarks/hook_load.py``, SQLite). ``GroupCommit.submit`` keeps the guarantee
(each caller returns only after the transaction holding its rows committed, or raises its
error) while callers that arrive during a write share the next one: no timer, no added delay
for a lone caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from starlette.concurrency import run_in_threadpool

T = TypeVar("T")


class GroupCommit(Generic[T]):
    def __init__(self, write: Callable[[list[T]], None]) -> None:
        self._write = write
        self._pending: list[tuple[list[T], asyncio.Future[None]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, rows: list[T]) -> None:
        """Return once ``rows`` are committed; raise the write's error if it failed."""
        if not rows:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((rows, done))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())
        await done

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await run_in_threadpool(self._write, [row for rows, _ in batch for row in rows])
            except Exception as exc:  # every caller of this batch gets the error, none is lost
                _settle(batch, exc)
            else:
                _settle(batch, None)


def _settle(batch: list[tuple[Any, asyncio.Future[None]]], exc: Exception | None) -> None:
    for _, done in batch:
        if done.done():  # the caller was cancelled (client gone): nothing to tell it
            continue
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)
