"""The embedding cache: arrays keyed by (content hash, model id), in SQLite or PostgreSQL.

The model id carries the model's version (checkpoint hash, config hash), so a new model is a
new key and a stale embedding is never served for it. Arrays are stored as raw bytes with
their dtype and shape, never pickled: reading the cache must not be able to run code.

Writers may race (two hooks for the same patient, the ingest worker and a hook): ``put`` is
``INSERT ... ON CONFLICT DO NOTHING`` on both dialects, so the second writer of a key is a
no-op, not an error. Embeddings are deterministic for a (content, model) pair, so keeping the
first one written loses nothing. SQLite runs in WAL mode with a busy timeout, so readers do
not block the writer and writers queue instead of failing with "database is locked".
"""

from __future__ import annotations

import contextlib
import json
import logging
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    LargeBinary,
    MetaData,
    String,
    Table,
    delete,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from mmcds.db import DatabaseError, create_tables, make_engine
from mmcds.metrics import observe_cache

log = logging.getLogger(__name__)

DEFAULT_TABLE = "mmcds_embeddings"
_CHUNK = 500  # keys per SELECT: well under SQLite's and PostgreSQL's parameter limits


class CacheError(DatabaseError):
    """The cache cannot be opened or used (bad URL, unreachable server, unsupported array)."""


def _table(metadata: MetaData, name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("content_hash", String(128), primary_key=True),
        Column("model_id", String(512), primary_key=True),
        Column("dtype", String(32), nullable=False),
        Column("shape", String(128), nullable=False),  # JSON list of ints
        Column("checksum", BigInteger, nullable=False),  # crc32 of data: detects a torn/bad row
        Column("data", LargeBinary, nullable=False),
        Column("created_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
    )


def encode_array(array: np.ndarray) -> tuple[str, str, bytes]:
    """(dtype, shape JSON, bytes) of an array; only plain numeric/bool dtypes are accepted."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "biufc":
        raise CacheError(f"cannot cache an array of dtype {arr.dtype}: only numeric arrays")
    return arr.dtype.str, json.dumps(list(arr.shape)), np.ascontiguousarray(arr).tobytes()


def decode_array(dtype: str, shape: str, data: bytes) -> np.ndarray:
    dims = tuple(int(d) for d in json.loads(shape))
    # copy: frombuffer views the driver's read-only bytes
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(dims).copy()


class EmbeddingCache:
    """Embeddings by (content hash, model id); ``url`` is a SQLAlchemy URL (SQLite, PostgreSQL)."""

    def __init__(self, url: str, *, table: str = DEFAULT_TABLE) -> None:
        try:
            self.engine: Engine = make_engine(url, purpose="embedding cache")
            self.dialect = self.engine.dialect.name
            self.table = _table(MetaData(), table)
            create_tables(self.engine, self.table, purpose="embedding cache")
        except DatabaseError as exc:
            raise CacheError(str(exc)) from exc

    def close(self) -> None:
        self.engine.dispose()

    # --- reads -----------------------------------------------------------------------------

    def get(self, content_hash: str, model_id: str) -> np.ndarray | None:
        return self.get_many([(content_hash, model_id)]).get((content_hash, model_id))

    def get_many(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], np.ndarray]:
        """The cached arrays among ``keys``; absent keys are simply not in the result."""
        by_model: dict[str, list[str]] = {}
        for content_hash, model_id in dict.fromkeys(keys):
            by_model.setdefault(model_id, []).append(content_hash)
        t = self.table
        found: dict[tuple[str, str], np.ndarray] = {}
        bad: list[tuple[str, str]] = []
        with self.engine.connect() as conn:
            for model_id, hashes in by_model.items():
                for i in range(0, len(hashes), _CHUNK):
                    query = select(t.c.content_hash, t.c.dtype, t.c.shape, t.c.checksum, t.c.data)
                    query = query.where(
                        t.c.model_id == model_id, t.c.content_hash.in_(hashes[i : i + _CHUNK])
                    )
                    for row in conn.execute(query):
                        key = (row.content_hash, model_id)
                        data = bytes(row.data)
                        try:
                            if zlib.crc32(data) != row.checksum:
                                raise ValueError("checksum mismatch")
                            found[key] = decode_array(row.dtype, row.shape, data)
                        except (ValueError, TypeError) as exc:
                            log.warning("dropping unreadable cache entry %s: %s", key, exc)
                            bad.append(key)
        if bad:  # a miss recomputes and re-puts it; left in place, DO NOTHING would keep it bad
            self._delete(bad)
        observe_cache(hits=len(found), misses=len(dict.fromkeys(keys)) - len(found))
        return found

    def __contains__(self, key: tuple[str, str]) -> bool:
        t = self.table
        query = select(t.c.content_hash).where(t.c.content_hash == key[0], t.c.model_id == key[1])
        with self.engine.connect() as conn:
            return conn.execute(query).first() is not None

    def count(self, model_id: str | None = None) -> int:
        query = select(func.count()).select_from(self.table)
        if model_id is not None:
            query = query.where(self.table.c.model_id == model_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    # --- writes ----------------------------------------------------------------------------

    def put(self, content_hash: str, model_id: str, array: np.ndarray) -> None:
        """Store ``array`` unless the key exists already (then keep the first: idempotent)."""
        self.put_many([(content_hash, model_id, array)])

    def put_many(self, items: Iterable[tuple[str, str, np.ndarray]]) -> None:
        rows = []
        for content_hash, model_id, array in items:
            dtype, shape, data = encode_array(array)
            rows.append(
                {
                    "content_hash": content_hash,
                    "model_id": model_id,
                    "dtype": dtype,
                    "shape": shape,
                    "checksum": zlib.crc32(data),
                    "data": data,
                }
            )
        if not rows:
            return
        if self.dialect in ("postgresql", "sqlite"):
            insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
            stmt = insert(self.table).on_conflict_do_nothing(
                index_elements=["content_hash", "model_id"]
            )
            with self.engine.begin() as conn:
                conn.execute(stmt, rows)
            return
        # Other dialects: row by row; a duplicate key means the other writer won, which is fine.
        for row in rows:
            with contextlib.suppress(IntegrityError), self.engine.begin() as conn:
                conn.execute(self.table.insert(), row)

    def _delete(self, keys: Sequence[tuple[str, str]]) -> None:
        t = self.table
        with self.engine.begin() as conn:
            for content_hash, model_id in keys:
                conn.execute(
                    delete(t).where(t.c.content_hash == content_hash, t.c.model_id == model_id)
                )

    def evict(self, model_id: str) -> int:
        """Delete every embedding of ``model_id`` (a retired model); returns how many."""
        t = self.table
        with self.engine.begin() as conn:
            result = conn.execute(delete(t).where(t.c.model_id == model_id))
        return int(result.rowcount or 0)
