"""The service's database: one SQLAlchemy engine setup shared by the cache, outbox and stores.

SQLite in a local file by default (WAL + busy timeout, so readers do not block the writer and
writers queue instead of failing with "database is locked"); PostgreSQL in production.
"""

from __future__ import annotations

import sqlite3
import time
import zlib
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, bindparam, create_engine, event, inspect, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.pool import StaticPool

from mmcds.errors import StorageError

SQLITE_BUSY_TIMEOUT_MS = 30_000


class DatabaseError(StorageError):
    """The database cannot be opened or used (bad URL, unreachable server)."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # busy_timeout first: switching to WAL itself needs a lock another process may hold
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # WAL is a property of the file: switch only when it is not WAL yet. The switch can answer
    # "database is locked" at once (no busy handler) while another process opens the same new
    # file, so retry it for a while.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            cur.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL is durable across app crashes
    cur.close()


def make_engine(url: str, *, purpose: str) -> Engine:
    """An engine for ``url``; ``purpose`` names the user in error messages."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise DatabaseError(f"bad database URL for the {purpose}: {exc}") from exc
    kwargs: dict[str, Any] = {"future": True}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {
            "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
            "check_same_thread": False,
        }
        if database in ("", ":memory:"):
            kwargs["poolclass"] = StaticPool  # one shared connection, or each sees no table
    else:
        kwargs["pool_pre_ping"] = True  # a restarted PostgreSQL must not break the service
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def create_tables(engine: Engine, *tables: Table, purpose: str) -> None:
    """Create missing tables; safe when several processes start at once."""
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                # Concurrent CREATE TABLE IF NOT EXISTS can still collide in pg_type; a
                # transaction-scoped advisory lock serialises the first start-ups.
                key = zlib.crc32(f"mmcds:{','.join(t.name for t in tables)}".encode())
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
            for table in tables:
                try:
                    table.create(conn, checkfirst=True)
                except (OperationalError, ProgrammingError, IntegrityError):
                    # Another process created it between our check and our CREATE (SQLite has
                    # no advisory lock); anything else is re-raised by the check below.
                    if not inspect(conn).has_table(table.name):
                        raise
    except OperationalError as exc:
        where = engine.url.render_as_string(hide_password=True)
        raise DatabaseError(
            f"cannot open the {purpose} at {where}: {exc.orig}. "
            "Check MMCDS_DATABASE_URL and that the server is running."
        ) from exc


def insert_ignoring(engine: Engine, table: Table, keys: list[str]) -> Any:
    """``INSERT ... ON CONFLICT (keys) DO NOTHING``: idempotent writes keyed by ``keys``; add
    ``.returning(...)`` to learn whether this writer inserted (rowcount is not portable)."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=keys)
    if engine.dialect.name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=keys)
    raise DatabaseError(f"unsupported database {engine.dialect.name}: use SQLite or PostgreSQL")


def insert_or_replace_where(
    engine: Engine, table: Table, keys: list[str], columns: list[str], where: Any
) -> Any:
    """``INSERT (columns) VALUES (:column, ...) ON CONFLICT (keys) DO UPDATE SET <the new row's
    values> WHERE where``: one atomic statement that writes a new row or takes over an existing
    one only when ``where`` holds (e.g. it has expired); with ``.returning(...)`` a row comes
    back only for the rows this writer won. Built once, with a bound parameter per column: its
    compiled form is cached, where a statement with the values inlined was compiled again on
    every call (most of a replay claim's CPU). Execute it with a list of rows (one
    ``executemany``, rows returned for all of them); the rows must not repeat a key."""
    if engine.dialect.name == "postgresql":
        stmt: Any = postgresql.insert(table)
    elif engine.dialect.name == "sqlite":
        stmt = sqlite.insert(table)
    else:
        raise DatabaseError(f"unsupported database {engine.dialect.name}: use SQLite or PostgreSQL")
    stmt = stmt.values({name: bindparam(name) for name in columns})
    updated = {name: stmt.excluded[name] for name in columns if name not in keys}
    return stmt.on_conflict_do_update(index_elements=keys, set_=updated, where=where)


class DriverQuery:
    """A SELECT compiled once for ``engine``, run on the driver's own cursor over a pooled
    connection: for a read on every hook, where SQLAlchemy's execution path (connection and
    result wrappers, the statement cache lookup) cost three times the read itself (SQLite)."""

    def __init__(self, engine: Engine, statement: Any) -> None:
        self.engine = engine
        compiled = statement.compile(dialect=engine.dialect)
        self.sql = compiled.string
        self._order: list[str] | None = compiled.positiontup  # None: named parameters

    def first(self, **params: Any) -> tuple[Any, ...] | None:
        """The first row for ``params`` (by bind parameter name), or None."""
        values = tuple(params[n] for n in self._order) if self._order is not None else params
        conn = self.engine.raw_connection()
        try:
            cursor = conn.cursor()
            try:
                cursor.execute(self.sql, values)
                row = cursor.fetchone()
            finally:
                cursor.close()
        finally:
            conn.close()  # back to the pool, which ends the read's transaction
        return None if row is None else tuple(row)
