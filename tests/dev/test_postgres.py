"""The throw-away PostgreSQL the fixtures start where none answers at 127.0.0.1:5432."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from mmcds.dev.postgres import ThrowawayPostgres
from mmcds.dev.servers import ServerUnavailable
from mmcds.store import EmbeddingCache


def test_throwaway_postgres_serves_the_store_and_leaves_nothing() -> None:
    try:
        server = ThrowawayPostgres().start()
    except ServerUnavailable as err:
        pytest.skip(str(err))
    with server:
        cache = EmbeddingCache(server.url)
        assert cache.dialect == "postgresql"
        cache.put("h", "m", np.arange(4, dtype=np.float32))
        np.testing.assert_array_equal(cache.get("h", "m"), np.arange(4, dtype=np.float32))
        cache.close()
        data = server._data
    assert data is not None and not data.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.url.replace("+psycopg", ""), connect_timeout=2).close()
