"""The embedding cache against SQLite (a temp file) and the real PostgreSQL test database."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from mmcds.encoders.labs import LabEncoder
from mmcds.store import CacheError, EmbeddingCache


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(URL, table): a fresh table per test; PostgreSQL's is dropped afterwards."""
    table = f"test_cache_{uuid.uuid4().hex[:12]}"
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cache.db'}", table
        return
    url = request.getfixturevalue("postgres_url")
    yield url, table
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f'DROP TABLE IF EXISTS "{table}"'))
    engine.dispose()


@pytest.fixture
def cache(target: tuple[str, str]) -> Iterator[EmbeddingCache]:
    c = EmbeddingCache(target[0], table=target[1])
    yield c
    c.close()


def test_round_trip_dtypes_and_shapes(cache: EmbeddingCache) -> None:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "f32": rng.normal(size=(3, 384)).astype(np.float32),
        "f16": rng.normal(size=64).astype(np.float16),
        "f64-fortran": np.asfortranarray(rng.normal(size=(4, 5))),
        "i64": np.arange(10, dtype=np.int64).reshape(2, 5),
        "bool": np.array([True, False, True]),
        "empty": np.zeros((0, 16), np.float32),
        "scalar": np.full((), 1.5, np.float32),
    }
    for key, arr in arrays.items():
        cache.put(key, "m:v1", arr)
    for key, arr in arrays.items():
        got = cache.get(key, "m:v1")
        assert got is not None and got.dtype == arr.dtype and got.shape == arr.shape, key
        np.testing.assert_array_equal(got, arr)
        got.flat[:1] = 0  # a writable copy, not a view of the driver's buffer
    assert cache.get("absent", "m:v1") is None
    assert cache.count() == len(arrays)


def test_stored_as_raw_bytes_not_pickle(cache: EmbeddingCache) -> None:
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    cache.put("h", "m", arr)
    t = cache.table
    with cache.engine.connect() as conn:
        row = conn.execute(t.select().where(t.c.content_hash == "h")).one()
    assert bytes(row.data) == arr.tobytes() and row.dtype == "<f4" and row.shape == "[2, 3]"
    with pytest.raises(CacheError, match="only numeric"):
        cache.put("obj", "m", np.array([{"a": 1}], dtype=object))


def test_get_many(cache: EmbeddingCache) -> None:
    keys = [(f"h{i}", "a:v1" if i % 2 else "b:v1") for i in range(1200)]  # > one SELECT chunk
    cache.put_many([(h, m, np.full(4, i, np.float32)) for i, (h, m) in enumerate(keys)])
    keys += [("h1", "b:v1"), ("nope", "a:v1"), ("h3", "a:v1")]  # wrong model, absent, repeat
    found = cache.get_many(keys)
    assert len(found) == 1200
    assert all(found[key][0] == i for i, key in enumerate(keys[:1200]))
    assert cache.get_many([]) == {}


def test_put_is_idempotent_and_keeps_first(cache: EmbeddingCache) -> None:
    first = np.ones(8, np.float32)
    cache.put("h", "m:v1", first)
    cache.put("h", "m:v1", first)
    cache.put("h", "m:v1", np.zeros(8, np.float32))  # a second writer: no error, first stays
    cache.put_many([("h", "m:v1", first), ("h2", "m:v1", first)])
    np.testing.assert_array_equal(cache.get("h", "m:v1"), first)
    assert cache.count() == 2


def test_new_model_version_is_a_new_key(cache: EmbeddingCache) -> None:
    """A re-fitted lab encoder has a new model id: its tokens never come from the old entry."""
    encoder = LabEncoder()
    old_id = encoder.model_id
    cache.put("frame-hash", old_id, np.ones((8, 16), np.float32))
    import pandas as pd

    encoder.fit(
        [pd.DataFrame({"name": ["wbc"] * 6, "value": [5.0, 6, 7, 8, 9, 10], "time": pd.NaT})]
    )
    assert encoder.model_id != old_id
    assert cache.get("frame-hash", encoder.model_id) is None
    assert cache.get_many([("frame-hash", encoder.model_id)]) == {}
    cache.put("frame-hash", encoder.model_id, np.zeros((8, 16), np.float32))
    assert cache.count() == 2 and cache.count(old_id) == 1
    assert cache.get("x", "text:aaaa") is None and cache.evict(old_id) == 1
    assert cache.get("frame-hash", old_id) is None


def test_corrupt_entry_is_a_miss_and_is_replaced(cache: EmbeddingCache) -> None:
    arr = np.arange(4, dtype=np.float32)
    cache.put("h", "m", arr)
    # fault injection (a torn write or a bad restore cannot be produced on demand): damage the
    # stored bytes directly in the database
    t = cache.table
    with cache.engine.begin() as conn:
        conn.execute(t.update().where(t.c.content_hash == "h").values(data=b"\x00" * 16))
    assert cache.get("h", "m") is None
    cache.put("h", "m", arr)
    np.testing.assert_array_equal(cache.get("h", "m"), arr)


def test_concurrent_threads_same_keys(target: tuple[str, str]) -> None:
    url, table = target
    shared = EmbeddingCache(url, table=table)
    keys = [f"k{i}" for i in range(40)]
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        # half the threads share one engine, half open their own, as separate workers do
        cache = shared if n % 2 else EmbeddingCache(url, table=table)
        try:
            barrier.wait()
            for k in keys:
                cache.put(k, "m:v1", np.full(16, int(k[1:]), np.float32))
                assert cache.get(k, "m:v1") is not None
            cache.put_many([(k, "m:v1", np.zeros(16, np.float32)) for k in keys])
        except BaseException as exc:  # noqa: BLE001 - reported below with the thread's index
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    assert shared.count() == len(keys)
    found = shared.get_many([(k, "m:v1") for k in keys])
    assert all(found[(k, "m:v1")][0] == int(k[1:]) for k in keys)
    shared.close()


WORKER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from mmcds.store import EmbeddingCache
    from pathlib import Path
    url, table, me, sync = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    (sync / f"ready-{me}").touch()
    while not (sync / "go").exists():  # line up so the first CREATE and the writes overlap
        time.sleep(0.002)
    cache = EmbeddingCache(url, table=table)
    for i in range(60):
        cache.put(f"shared{i}", "m:v1", np.full(32, i, np.float32))
        cache.put(f"{me}-own{i % 10}", "m:v1", np.full(32, i, np.float32))
    print("ok", cache.count())
    """
)


def test_concurrent_processes_same_keys(target: tuple[str, str], tmp_path: Path) -> None:
    """Four processes create the table and write the same keys at the same moment."""
    url, table = target
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, table, f"p{n}", str(sync)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    deadline = time.monotonic() + 60
    while len(list(sync.glob("ready-*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    (sync / "go").touch()
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0 and out.startswith("ok"), err
    cache = EmbeddingCache(url, table=table)
    assert cache.count() == 60 + 4 * 10
    found = cache.get_many([(f"shared{i}", "m:v1") for i in range(60)])
    assert [int(found[(f"shared{i}", "m:v1")][0]) for i in range(60)] == list(range(60))
    cache.close()


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    cache = EmbeddingCache(f"sqlite:///{tmp_path / 'sub' / 'c.db'}")  # creates the folder
    with cache.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert int(conn.execute(text("PRAGMA busy_timeout")).scalar_one()) >= 1000
    cache.close()


def test_unreachable_database_says_what_to_check() -> None:
    with pytest.raises(CacheError, match="MMCDS_DATABASE_URL"):
        EmbeddingCache("postgresql+psycopg://postgres@127.0.0.1:1/test")
    with pytest.raises(CacheError, match="bad database URL"):
        EmbeddingCache("not a url")
