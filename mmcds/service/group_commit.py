"""Group commit: many concurrent callers' rows written in one blocking transaction.

A hook must not answer before its writes are stored (its JWT's ``jti`` claimed in the shared
replay cache, its card links for feedback), but one transaction per hook made each write a
large share of a warm hook's CPU under load, and a blocking database call on the event loop
stalls every other hook meanwhile (py-spy on ``benchmarks/hook_load.py``). ``GroupCommit.submit``
keeps the guarantee (each caller returns only after the transaction holding its rows committed,
with its rows' results, or raises its error) while callers that arrive during a write share the
next one: no timer, no added delay for a lone caller; the write runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from starlette.concurrency import run_in_threadpool

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """``write(rows)`` must return one result per row, in order."""

    def __init__(self, write: Callable[[list[T]], Sequence[R]]) -> None:
        self._write = write
        self._pending: list[tuple[list[T], asyncio.Future[list[R]]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, rows: list[T]) -> list[R]:
        """The results of ``rows`` once committed; raise the write's error if it failed."""
        if not rows:
            return []
        done: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        self._pending.append((rows, done))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())
        return await done

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await run_in_threadpool(
                    self._write, [row for rows, _ in batch for row in rows]
                )
            except Exception as exc:  # every caller of this batch gets the error, none is lost
                _settle(batch, None, exc)
            else:
                _settle(batch, list(results), None)


def _settle(
    batch: list[tuple[list[Any], asyncio.Future[list[Any]]]],
    results: list[Any] | None,
    exc: Exception | None,
) -> None:
    start = 0
    for rows, done in batch:
        mine = results[start : start + len(rows)] if results is not None else []
        start += len(rows)
        if done.done():  # the caller was cancelled (client gone): nothing to tell it
            continue
        if exc is None:
            done.set_result(mine)
        else:
            done.set_exception(exc)
